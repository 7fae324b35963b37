"""Parse a harmony completion into reasoning (analysis) and answer (final), with openai-harmony.

The token counts come from the same parse: harmony's streaming parser says where each message
ends, and a message's tokens count as output when harmony gives it the ``final`` channel, from
its header's ``<|channel|>`` on (the ``<|start|>assistant`` announcing it counts as reasoning,
as the first message's lies in the prompt).
"""

from dataclasses import dataclass

from openai_harmony import HarmonyError, Role, StreamableParser, StreamState

from ossbatch.pipeline.harmony import CALL, CHANNEL, END, RETURN, harmony_encoding

_CLOSERS = frozenset((END, RETURN, CALL))


@dataclass
class ParsedCompletion:
    status: str  # ok | length | error
    finish_reason: str  # stop | length | error
    output_text: str | None
    reasoning_text: str | None
    error: str | None
    reasoning_tokens: int
    output_tokens: int


def parse_completion(token_ids: list[int], finish_reason: str) -> ParsedCompletion:
    """`finish_reason` is the engine's: "stop" (a stop token ended it) or "length"."""
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
    messages = parser.messages
    if error is None and len(messages) > len(spans):  # a truncated last message, closed by process_eos
        spans.append((spans[-1][1] if spans else 0, len(token_ids)))
    output_tokens = sum(_output_tokens(token_ids, span) for span, m in zip(spans, messages) if m.channel == "final")
    reasoning_tokens = len(token_ids) - output_tokens
    if error is not None:
        if truncated:  # cut off inside a header: it ran out of tokens, which is what the row needs to know
            return ParsedCompletion("length", "length", None, None, f"truncated completion does not parse as harmony: {error}",
                                    reasoning_tokens, output_tokens)
        return ParsedCompletion("error", "error", None, None, f"completion does not parse as harmony: {error}",
                                reasoning_tokens, output_tokens)
    reasoning, output = [], []
    for message in messages:
        text = "".join(part.text for part in message.content if hasattr(part, "text"))
        (output if message.channel == "final" else reasoning).append(text)
    return ParsedCompletion(
        status="length" if truncated else "ok",
        finish_reason=finish_reason,
        output_text="".join(output) if output else None,
        reasoning_text="\n".join(reasoning) if reasoning else None,
        error=None,
        reasoning_tokens=reasoning_tokens,
        output_tokens=output_tokens,
    )


def _output_tokens(token_ids: list[int], span: tuple[int, int]) -> int:
    """A final message's output tokens: its span from the header's ``<|channel|>`` on."""
    start, stop = span
    header = token_ids.index(CHANNEL, start, stop) if CHANNEL in token_ids[start:stop] else start
    return stop - header
