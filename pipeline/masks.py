"""Token masks for the rows of one ``engine.generate`` call, some constrained, some not.

The engine's ``TokenConstraint`` protocol, per decoding step over the step's rows: ``prepare``
(masks for the next token computed in a background thread by llguidance, which releases the
GIL, while the forward pass runs), ``apply`` (wait, then set disallowed tokens to -inf in
place), ``advance`` (consume the sampled tokens). ``errors()`` says, per row, why its
constraint failed; a failed row is forced to ``<|return|>`` so that it ends at once.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Sequence

import llguidance
import llguidance.torch as llg_torch
import numpy as np
import torch

from ossbatch.pipeline.grammar import RowGrammar, clean_llg_error
from ossbatch.pipeline.harmony import RETURN, harmony_encoding, lltokenizer

__all__ = ["BatchConstraint"]


@lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    """llguidance's mask thread pool (80% of the cores, up to 32), shared by every batch."""
    return llguidance.LLExecutor()


@lru_cache(maxsize=1)
def _mask_pool() -> ThreadPoolExecutor:
    """Background threads that hand each batch's mask work to llguidance (which drops the GIL)."""
    return ThreadPoolExecutor(4, thread_name_prefix="llg-mask")


class BatchConstraint:
    """Token masks for a batch of rows, some constrained (``RowGrammar``), some not (``None``).

    ``rows`` name the batch rows of a step, in the order of that step's logits; a row not in a
    step (waiting for a KV slot, or finished) is not touched.
    """

    def __init__(self, grammars: Sequence[RowGrammar | None], vocab_size: int):
        self.batch_size = len(grammars)
        self.vocab_size = int(vocab_size)
        self.tok_vocab = lltokenizer().vocab_size
        if self.vocab_size < self.tok_vocab:
            raise ValueError(f"model vocab {self.vocab_size} is smaller than the tokenizer's {self.tok_vocab}")
        self._matchers: list[llguidance.LLMatcher | None] = [g.new_matcher() if g is not None else None for g in grammars]
        self._errors: list[str | None] = [None] * self.batch_size
        # Two buffers: the one applied at step t may still be in flight to the GPU while step t+1's
        # masks are written. They grow to the most rows one step masks (the KV slots, not the run).
        self._bitmasks = [llg_torch.allocate_token_bitmask(1, self.tok_vocab) for _ in range(2)]
        self._flip = 0
        self._pool: ThreadPoolExecutor | None = _mask_pool() if any(m is not None for m in self._matchers) else None
        self._pending: Future | None = None
        self._prepared: tuple[list[int], torch.Tensor] | None = None
        self._consumed = [0] * self.batch_size  # tokens each row's matcher has taken

    def prepare(self, rows: Sequence[int]) -> None:
        """Start computing the next-token masks of the constrained rows among ``rows``."""
        if self._pool is None:
            return
        self._finish_pending()
        constrained = [int(i) for i in rows if self._matchers[int(i)] is not None]
        if len(constrained) > self._bitmasks[0].shape[0]:
            self._bitmasks = [llg_torch.allocate_token_bitmask(len(constrained), self.tok_vocab) for _ in range(2)]
        bitmask = self._bitmasks[self._flip]
        self._flip ^= 1
        self._prepared = (constrained, bitmask)
        if constrained:
            self._pending = self._pool.submit(self._fill, constrained, bitmask)

    def apply(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        """Wait for ``prepare``'s masks and set disallowed tokens of constrained rows to -inf.
        ``logits`` is ``[len(rows), V]``: logits row k belongs to batch row ``rows[k]``."""
        if self._pool is None:
            return
        if self._prepared is None:
            self.prepare(rows)
        self._finish_pending()
        constrained, bitmask = self._prepared
        self._prepared = None
        if constrained:
            self._apply(logits, constrained, bitmask, rows)

    def _apply(self, logits: torch.Tensor, constrained: list[int], bitmask: torch.Tensor, rows: Sequence[int]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [{len(rows)}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < self.tok_vocab:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than the tokenizer's {self.tok_vocab}")
        position = {int(r): k for k, r in enumerate(rows)}  # batch row -> its row in these logits
        at = [position[i] for i in constrained]
        n = len(at)
        banned = self._banned(bitmask[:n], logits.device)  # bool [n, tok_vocab]
        if n == logits.shape[0] and at == list(range(n)):  # every row constrained: work on views
            logits[:, : self.tok_vocab].masked_fill_(banned, -math.inf)
            if logits.shape[1] > self.tok_vocab:
                logits[:, self.tok_vocab :] = -math.inf
            return
        # some rows unconstrained: mask runs of consecutive rows through views
        # (index_select/index_copy_ of [n, V] are slow on CPU)
        for slot, start, stop in _runs(at):
            view = logits[start:stop]
            view[:, : self.tok_vocab].masked_fill_(banned[slot : slot + stop - start], -math.inf)
            if view.shape[1] > self.tok_vocab:
                view[:, self.tok_vocab :] = -math.inf

    def advance(self, tokens: torch.Tensor | Sequence[int], rows: Sequence[int]) -> None:
        """Consume each constrained row's sampled token (``tokens[k]`` for batch row ``rows[k]``);
        a token the grammar rejects fails its row."""
        self._finish_pending()  # advance without apply: finish the stray mask first
        self._prepared = None
        if self._pool is None:
            return
        toks = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        pairs: list[tuple[llguidance.LLMatcher, int]] = []
        pair_rows: list[int] = []
        for i, t in zip(map(int, rows), map(int, toks)):
            if self._matchers[i] is None or self._errors[i] is not None:
                continue
            if not 0 <= t < self.tok_vocab:
                self._fail(i, f"token {t} is outside the tokenizer vocabulary ({self.tok_vocab})")
                continue
            pairs.append((self._matchers[i], t))
            pair_rows.append(i)
        if not pairs:
            return
        try:
            ok = _executor().consume_token_par(pairs)
        except Exception as err:  # an llguidance failure fails these rows, never the batch
            for i in pair_rows:
                self._fail(i, f"constraint matcher failed: {err}")
            return
        for i, (m, t), good in zip(pair_rows, pairs, ok):
            self._consumed[i] += 1
            if not good:
                self._fail(i, f"token {t} ({_describe(t)}) rejected by the grammar at token {self._consumed[i]}: "
                              f"{clean_llg_error(m.get_error())}")

    def errors(self) -> list[str | None]:
        """Per row: ``None`` or why its constraint failed (grammar violated, matcher error)."""
        return list(self._errors)

    def _fail(self, row: int, reason: str) -> None:
        if self._errors[row] is None:
            self._errors[row] = reason

    def _finish_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _fill(self, rows: list[int], bitmask: torch.Tensor) -> None:
        pairs = [(self._matchers[i], slot) for slot, i in enumerate(rows) if self._errors[i] is None]
        if pairs:
            try:
                llg_torch.fill_next_token_bitmask_par(_executor(), pairs, bitmask[: len(rows)])
            except Exception as err:  # an llguidance failure fails these rows, never the batch
                for _, slot in pairs:
                    self._fail(rows[slot], f"constraint mask failed: {err}")
        for slot, i in enumerate(rows):
            if self._errors[i] is not None:
                # failed row: only <|return|>, so the engine ends it now
                bitmask[slot].zero_()
                bitmask[slot, RETURN // 32] = _bit(RETURN % 32)

    def _banned(self, bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return banned_numpy(bitmask, self.tok_vocab)
        return banned_torch(bitmask.to(device, non_blocking=bitmask.is_pinned()), self.tok_vocab)


def _describe(t: int) -> str:
    try:
        return repr(harmony_encoding().decode([t]))
    except Exception:
        return "?"


def banned_numpy(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmask [n, W] on the CPU (bit j of word w allows token 32w+j) -> bool [n, vocab],
    True where the token is NOT allowed (a view of one unpacked byte per token)."""
    bits = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)[:, :vocab]


def banned_torch(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The same on any device, with torch ops (used for GPU logits)."""
    n = bitmask.shape[0]
    u8 = bitmask.contiguous().view(torch.uint8).reshape(n, -1)  # little-endian bytes
    bits = (u8.unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    return bits.reshape(n, -1)[:, :vocab] == 0


@lru_cache(maxsize=None)
def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def _runs(rows: list[int]):
    """(first slot, start row, stop row) for each run of consecutive row indices."""
    slot = 0
    while slot < len(rows):
        end = slot
        while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
            end += 1
        yield slot, rows[slot], rows[end] + 1
        slot = end + 1


def _bit(j: int) -> int:
    """int32 value with only bit j set (two's complement for j == 31)."""
    v = 1 << j
    return v - (1 << 32) if v >= (1 << 31) else v
