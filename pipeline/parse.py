"""Parse a harmony completion into reasoning (analysis) and answer (final)."""

from dataclasses import dataclass
from functools import lru_cache

from openai_harmony import HarmonyError, Role

from ossbatch.pipeline.harmony import harmony_encoding


@dataclass
class ParsedCompletion:
    status: str  # ok | length | error
    finish_reason: str  # stop | length | error
    output_text: str | None
    reasoning_text: str | None
    error: str | None
    reasoning_tokens: int
    output_tokens: int


@lru_cache(maxsize=1)
def _header_tokens() -> tuple[int, list[int], int]:
    enc = harmony_encoding()
    channel, message = enc.encode("<|channel|>", allowed_special="all")[0], enc.encode("<|message|>", allowed_special="all")[0]
    return channel, enc.encode("final", disallowed_special=()), message


def _final_message_start(token_ids: list[int]) -> int | None:
    """Index of the first token of the final channel's message header, if any."""
    channel, final, message = _header_tokens()
    for i, token in enumerate(token_ids):
        if token == channel and token_ids[i + 1 : i + 1 + len(final)] == final:
            if token_ids[i + 1 + len(final) : i + 2 + len(final)] == [message]:
                return i
    return None


def parse_completion(token_ids: list[int], finish_reason: str) -> ParsedCompletion:
    """`finish_reason` is the engine's: "stop" (a stop token ended it) or "length"."""
    final_at = _final_message_start(token_ids)
    reasoning_tokens = len(token_ids) if final_at is None else final_at
    output_tokens = len(token_ids) - reasoning_tokens
    truncated = finish_reason == "length"
    try:
        # A truncated completion has no closing token: parse what there is, leniently.
        messages = harmony_encoding().parse_messages_from_completion_tokens(token_ids, Role.ASSISTANT, strict=not truncated)
    except HarmonyError as err:
        if truncated:  # cut off inside a header: it ran out of tokens, which is what the row needs to know
            return ParsedCompletion("length", "length", None, None, f"truncated completion does not parse as harmony: {err}",
                                    reasoning_tokens, output_tokens)
        return ParsedCompletion("error", "error", None, None, f"completion does not parse as harmony: {err}", reasoning_tokens, output_tokens)
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
