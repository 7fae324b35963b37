"""Parse a harmony completion into reasoning (analysis), answer (final) and function calls, with
openai-harmony.

A call is a message harmony parses with the recipient ``functions.NAME`` (gpt-oss writes it on the
commentary channel and ends it with ``<|call|>``, a stop token, so a completion holds at most one);
its content is the call's arguments, its ``finish_reason`` ``tool_calls``. A call to anything but a
function, or to a function the request does not define, fails the row.

The token counts come from the same parse: harmony's streaming parser says where each message
ends, and a message's tokens count as output when harmony gives it the ``final`` channel, from
its header's ``<|channel|>`` on, or makes it a call, from after its ``<|start|>assistant`` (that
announcement counts as reasoning, as the first message's lies in the prompt).

A header's ``<|constrain|>TYPE`` is the message's content type, never its recipient: harmony
(0.0.8) reads a lone one after the channel, as in ``<|channel|>final <|constrain|>json``, as the
recipient (openai/harmony#144), so each parsed message's header is read again here.
"""

from dataclasses import dataclass, field

from openai_harmony import HarmonyError, Message, Role, StreamableParser, StreamState

from ossbatch.pipeline.harmony import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, harmony_encoding
from ossbatch.pipeline.tools import function_name

_CLOSERS = frozenset((END, RETURN, CALL))


@dataclass
class ParsedCompletion:
    status: str  # ok | length | error
    finish_reason: str  # stop | length | tool_calls | error
    output_text: str | None
    reasoning_text: str | None
    error: str | None
    reasoning_tokens: int
    output_tokens: int
    tool_calls: list[dict] | None = None  # [{name, arguments}] in order; None without calls
    # [start, stop) of each final answer message's content tokens (after its <|message|>, before its closing token)
    answer_spans: list[tuple[int, int]] = field(default_factory=list)


def parse_completion(token_ids: list[int], finish_reason: str, functions: frozenset[str] = frozenset()) -> ParsedCompletion:
    """`finish_reason` is the engine's: "stop" (a stop token ended it) or "length"; ``functions``
    are the names of the request's function tools."""
    truncated = finish_reason == "length"
    # A truncated completion has no closing token: parse what there is, leniently.
    parser = StreamableParser(harmony_encoding(), Role.ASSISTANT, strict=not truncated)
    spans: list[tuple[int, int]] = []  # each completed message's tokens: [start, stop)
    try:
        for i, token in enumerate(token_ids):
            parser.process(token)
            # only a closing token can end a message: ask the parser then (its state is JSON)
            if token in _CLOSERS and parser.state == StreamState.EXPECT_START:
                spans.append((spans[-1][1] if spans else 0, i + 1))
        parser.process_eos()
        error = None
    except HarmonyError as err:
        error = err
    messages = [_constraint_not_recipient(message) for message in parser.messages]
    if error is None and len(messages) > len(spans):  # a truncated last message, closed by process_eos
        spans.append((spans[-1][1] if spans else 0, len(token_ids)))
    output_tokens = sum(_output_tokens(token_ids, span) for span, m in zip(spans, messages)
                        if m.channel == "final" and not m.recipient)
    output_tokens += sum(_call_tokens(token_ids, span) for span, m in zip(spans, messages) if m.recipient)
    reasoning_tokens = len(token_ids) - output_tokens
    if error is not None:
        if truncated:  # cut off inside a header: it ran out of tokens, which is what the row needs to know
            return ParsedCompletion("length", "length", None, None, f"truncated completion does not parse as harmony: {error}",
                                    reasoning_tokens, output_tokens)
        return ParsedCompletion("error", "error", None, None, f"completion does not parse as harmony: {error}",
                                reasoning_tokens, output_tokens)
    reasoning, output, calls = [], [], []
    for message in messages:
        text = "".join(part.text for part in message.content if hasattr(part, "text"))
        if message.recipient:
            name = function_name(message.recipient)
            if truncated:  # a call cut off (its name too, maybe) is no call: the row ran out of tokens
                continue
            if name not in functions:
                known = f"the request's functions are {', '.join(sorted(functions))}" if functions else "the request has no tools"
                return ParsedCompletion("error", "error", None, None, f"completion calls {message.recipient!r}, "
                                        f"which is not a function it may call ({known})", reasoning_tokens, output_tokens)
            calls.append({"name": name, "arguments": text})
        else:
            (output if message.channel == "final" else reasoning).append(text)
    called = bool(calls) and not truncated
    return ParsedCompletion(
        status="length" if truncated else "ok",
        finish_reason="tool_calls" if called else finish_reason,
        output_text="".join(output) if output else None,
        reasoning_text="\n".join(reasoning) if reasoning else None,
        error=None,
        reasoning_tokens=reasoning_tokens,
        output_tokens=output_tokens,
        tool_calls=calls if called else None,
        answer_spans=[_content_span(token_ids, span) for span, m in zip(spans, messages)
                      if m.channel == "final" and not m.recipient and MESSAGE in token_ids[span[0]:span[1]]],
    )


def final_content_spans(token_ids: list[int]) -> list[tuple[int, int]]:
    """The answer spans of a completion parsed alone (one that does not end in a closing token is
    parsed as truncated); `parse_completion` gives the same as ``answer_spans``."""
    truncated = not token_ids or token_ids[-1] not in _CLOSERS
    return parse_completion(token_ids, "length" if truncated else "stop").answer_spans


def _constraint_not_recipient(message: Message) -> Message:
    """The message with a recipient harmony read from a ``<|constrain|>TYPE`` made its content type
    (a header ``final <|constrain|>json`` is a constrained answer, not a message to ``<|constrain|>json``)."""
    marker = harmony_encoding().decode([CONSTRAIN])
    if not message.recipient or not message.recipient.startswith(marker):
        return message
    # "<|constrain|> json" (a space after the marker) reads as recipient "<|constrain|>", content type "json"
    return message.model_copy(update={"recipient": None, "content_type": message.recipient + (message.content_type or "")})


def _content_span(token_ids: list[int], span: tuple[int, int]) -> tuple[int, int]:
    """A message's content: after its header's ``<|message|>``, up to its closing token (or the end
    of a truncated completion)."""
    start, stop = span
    return token_ids.index(MESSAGE, start, stop) + 1, stop - 1 if token_ids[stop - 1] in _CLOSERS else stop


def _output_tokens(token_ids: list[int], span: tuple[int, int]) -> int:
    """A final message's output tokens: its span from the header's ``<|channel|>`` on."""
    start, stop = span
    header = token_ids.index(CHANNEL, start, stop) if CHANNEL in token_ids[start:stop] else start
    return stop - header


def _call_tokens(token_ids: list[int], span: tuple[int, int]) -> int:
    """A call's output tokens: its span after the ``<|start|>assistant`` that announces it."""
    start, stop = span
    return stop - start - (2 if token_ids[start] == START else 0)
