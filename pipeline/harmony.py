"""The gpt-oss tokenizer, built once from the local o200k vocabulary: openai-harmony's encoding
(rendering and parsing) and the llguidance tokenizer (constrained decoding).

Both read the same file, ``o200k_base.tiktoken``, from one folder: ``$TIKTOKEN_ENCODINGS_BASE``,
else the project's ``../shared/tiktoken`` (offline machines keep it there). openai-harmony finds
its vocabulary only through ``TIKTOKEN_ENCODINGS_BASE``, so this module, and no other, sets that
variable (only when it is unset and the shared copy exists). The llguidance tokenizer takes the
BPE ranks from tiktoken's ``load_tiktoken_bpe`` on that file (its SHA-256 checked against
tiktoken's own) and the pre-tokenisation pattern from tiktoken's o200k definition.
"""

from __future__ import annotations

import os
import types
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import openai_harmony

if TYPE_CHECKING:
    import llguidance

__all__ = [
    "CALL", "CHANNEL", "CONSTRAIN", "END", "MESSAGE", "RETURN", "START",
    "TOKENIZER_VOCAB_SIZE", "harmony_encoding", "lltokenizer", "o200k_harmony_definition", "vocabulary_dir",
]

# o200k_harmony: 199998 BPE ranks + special tokens up to <|reserved_201087|>.
TOKENIZER_VOCAB_SIZE = 201088

# Harmony's special-token ids. The grammar names headers by these ids and the masks force a
# failed row to RETURN; `lltokenizer()` checks every one against openai-harmony's encoding.
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = 200002, 200003, 200005, 200006, 200007, 200008, 200012
_FIXED_IDS = {"<|return|>": RETURN, "<|constrain|>": CONSTRAIN, "<|channel|>": CHANNEL, "<|start|>": START,
              "<|end|>": END, "<|message|>": MESSAGE, "<|call|>": CALL}

VOCAB_FILE = "o200k_base.tiktoken"
_ENCODINGS_BASE = "TIKTOKEN_ENCODINGS_BASE"
_SHARED_VOCABULARY = Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken"


def vocabulary_dir() -> Path | None:
    """The local folder holding ``o200k_base.tiktoken``, or None (then it is downloaded)."""
    base = os.environ.get(_ENCODINGS_BASE)
    if base:
        return Path(base) if "://" not in base and (Path(base) / VOCAB_FILE).is_file() else None
    return _SHARED_VOCABULARY if (_SHARED_VOCABULARY / VOCAB_FILE).is_file() else None


@lru_cache(maxsize=1)
def harmony_encoding() -> openai_harmony.HarmonyEncoding:
    """openai-harmony's HARMONY_GPT_OSS encoding (loaded once)."""
    if _ENCODINGS_BASE not in os.environ and vocabulary_dir() is not None:
        os.environ[_ENCODINGS_BASE] = str(vocabulary_dir())
    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@lru_cache(maxsize=1)
def o200k_harmony_definition() -> dict:
    """tiktoken's o200k_harmony definition: ``pat_str``, ``mergeable_ranks``, ``special_tokens``.

    tiktoken_ext.openai_public's constructors read the vocabulary with ``load_tiktoken_bpe`` from
    its download address; here a copy of them is bound to a loader of the local file (the
    expected SHA-256 is still checked by tiktoken). Nothing in tiktoken is modified.
    """
    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import load_tiktoken_bpe

    folder = vocabulary_dir()
    if folder is None:
        return openai_public.o200k_harmony()

    def load_local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return load_tiktoken_bpe(str(folder / VOCAB_FILE), expected_hash)

    namespace = dict(vars(openai_public), load_tiktoken_bpe=load_local)
    for name in ("o200k_base", "o200k_harmony"):
        namespace[name] = types.FunctionType(getattr(openai_public, name).__code__, namespace, name)
    return namespace["o200k_harmony"]()


def _special_ids() -> dict[str, int]:
    """Special tokens of o200k_harmony within the model vocabulary, one name per id (harmony's)."""
    enc = harmony_encoding()
    out: dict[str, int] = {}
    for name in enc.special_tokens_set:
        (tid,) = enc.encode(name, allowed_special="all")
        if tid < TOKENIZER_VOCAB_SIZE:  # harmony also names <|reserved_201088|>, outside the model vocab
            out[name] = tid
    for name, tid in _FIXED_IDS.items():
        if out.get(name) != tid:
            raise RuntimeError(f"harmony special token {name} has id {out.get(name)}, expected {tid}")
    return out


@lru_cache(maxsize=1)
def lltokenizer() -> "llguidance.LLTokenizer":
    """The llguidance tokenizer for o200k_harmony (built once, ~1 s).

    BPE ranks and the pre-tokenisation pattern from tiktoken's o200k_harmony definition;
    special tokens from openai-harmony (one name per id, ids verified). EOS is ``<|return|>``,
    the token that ends a constrained completion.
    """
    import llguidance  # only rows with a constraint need it

    definition = o200k_harmony_definition()
    special: dict[str, int] = {}
    seen: set[int] = set()
    # tiktoken's table names id 200018 twice (<|endofprompt|> and <|reserved_200018|>): harmony's name wins.
    for name, tid in sorted(_special_ids().items(), key=lambda kv: kv[1]):
        if tid not in seen:
            seen.add(tid)
            special[name] = tid
    tok = llguidance.LLTokenizer.from_tiktoken(
        encoder=definition["mergeable_ranks"],
        special_tokens=special,
        pattern=definition["pat_str"],
        eos_token=RETURN,
        n_vocab=TOKENIZER_VOCAB_SIZE,
    )
    if tok.vocab_size != TOKENIZER_VOCAB_SIZE:
        raise RuntimeError(f"llguidance tokenizer has {tok.vocab_size} tokens, expected {TOKENIZER_VOCAB_SIZE}")
    return tok
