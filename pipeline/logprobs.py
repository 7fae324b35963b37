"""Logprobs as results: a token's text and bytes, the final answer's tokens among a completion's,
and the per-token records the Parquet columns and the Batch bodies carry.

The engine gives ids and logprobs under the model's raw distribution (its logits before any
grammar mask, at temperature 1); this module only names the tokens and picks out the answer's.
"""

from __future__ import annotations

from functools import lru_cache

from ossbatch.pipeline.harmony import o200k_harmony_definition

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


def top_entries(alternatives: list[tuple[int, float]]) -> list[dict]:
    """One token's alternatives as ``{token_id, token, logprob}`` records, most likely first."""
    return [{"token_id": t, "token": token_text(t), "logprob": v} for t, v in alternatives]


def output_top_logprobs(top: list[list[tuple[int, float]]] | None) -> list[list[dict]] | None:
    """The ``output_top_logprobs`` column: every generated token's alternatives."""
    return None if top is None else [top_entries(alternatives) for alternatives in top]


def answer_logprobs(token_ids: list[int], logprobs: list[float] | None, top: list[list[tuple[int, float]]] | None,
                    answer_spans: list[tuple[int, int]]) -> list[dict] | None:
    """The ``answer_logprobs`` column: the final answer's tokens (what OpenAI's logprobs cover;
    reasoning tokens are not content; ``answer_spans`` from the parse), each
    ``{token_id, token, logprob, top_logprobs}``."""
    if logprobs is None:
        return None
    return [{"token_id": token_ids[i], "token": token_text(token_ids[i]), "logprob": logprobs[i],
             "top_logprobs": top_entries(top[i]) if top is not None else []}
            for start, stop in answer_spans for i in range(start, stop)]


def openai_logprobs(entries: list[dict] | None) -> list[dict]:
    """``answer_logprobs`` in OpenAI's format: ``{token, logprob, bytes, top_logprobs}``."""
    def one(entry: dict) -> dict:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(token_bytes(entry["token_id"]))}

    return [one(e) | {"top_logprobs": [one(t) for t in e.get("top_logprobs") or []]} for e in entries or []]
