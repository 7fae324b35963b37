"""Logprobs as results: a token's text and bytes, the final answer's tokens among a completion's,
and the per-token records the Parquet columns and the Batch bodies carry.

The engine gives ids and logprobs under the model's raw distribution (its logits before any
grammar mask, at temperature 1); this module only names the tokens and picks out the answer's.
"""

from __future__ import annotations

from functools import lru_cache

from ossbatch.pipeline.harmony import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, o200k_harmony_definition

_CLOSERS = (END, RETURN, CALL)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@lru_cache(maxsize=1)
def tiktoken_encoding():
    """tiktoken's o200k_harmony encoding (every id of the model's vocabulary decodes to bytes)."""
    import tiktoken

    return tiktoken.Encoding(**o200k_harmony_definition())


@lru_cache(maxsize=65536)
def token_bytes(token_id: int) -> bytes:
    return tiktoken_encoding().decode_single_token_bytes(token_id)


def token_text(token_id: int) -> str:
    """The token's text; bytes that are part of a longer UTF-8 character show as U+FFFD."""
    return token_bytes(token_id).decode("utf-8", errors="replace")


def encode_text(text: str) -> list[int]:
    """The ordinary (no special tokens) tokens of ``text``."""
    return tiktoken_encoding().encode_ordinary(text)


def final_content_spans(token_ids: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of each final-channel message's content among a completion's tokens: after
    its header's ``<|message|>``, up to its closing token (or the end of a truncated completion)."""
    spans, header_start, i = [], 0, 0
    while i < len(token_ids):
        token = token_ids[i]
        if token == START:
            header_start = i + 1
        elif token == MESSAGE:
            header = token_ids[header_start:i]
            stop = next((j for j in range(i + 1, len(token_ids)) if token_ids[j] in _CLOSERS), len(token_ids))
            if _channel(header) == "final":
                spans.append((i + 1, stop))
            header_start = i = stop + 1
            continue
        i += 1
    return spans


def _channel(header: list[int]) -> str | None:
    if CHANNEL not in header:
        return None
    after = header[header.index(CHANNEL) + 1:]
    name = after[: after.index(CONSTRAIN)] if CONSTRAIN in after else after
    words = b"".join(token_bytes(t) for t in name).decode("utf-8", errors="replace").split()
    return words[0] if words else None


def top_entries(alternatives: list[tuple[int, float]]) -> list[dict]:
    """One token's alternatives as ``{token_id, token, logprob}`` records, most likely first."""
    return [{"token_id": t, "token": token_text(t), "logprob": v} for t, v in alternatives]


def output_top_logprobs(top: list[list[tuple[int, float]]] | None) -> list[list[dict]] | None:
    """The ``output_top_logprobs`` column: every generated token's alternatives."""
    return None if top is None else [top_entries(alternatives) for alternatives in top]


def answer_logprobs(token_ids: list[int], logprobs: list[float] | None,
                    top: list[list[tuple[int, float]]] | None) -> list[dict] | None:
    """The ``answer_logprobs`` column: the final answer's tokens (what OpenAI's logprobs cover;
    reasoning tokens are not content), each ``{token_id, token, logprob, top_logprobs}``."""
    if logprobs is None:
        return None
    return [{"token_id": token_ids[i], "token": token_text(token_ids[i]), "logprob": logprobs[i],
             "top_logprobs": top_entries(top[i]) if top is not None else []}
            for start, stop in final_content_spans(token_ids) for i in range(start, stop)]


def openai_logprobs(entries: list[dict] | None) -> list[dict]:
    """``answer_logprobs`` in OpenAI's format: ``{token, logprob, bytes, top_logprobs}``."""
    def one(entry: dict) -> dict:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(token_bytes(entry["token_id"]))}

    return [one(e) | {"top_logprobs": [one(t) for t in e.get("top_logprobs") or []]} for e in entries or []]
