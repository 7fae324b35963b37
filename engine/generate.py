"""The generation loop, in steps (as gpt-fast separates prefill and decode):

- `SlotScheduler`: which rows hold the KV cache's slots: admit waiting rows,
  free a stopped row's slot, refill it;
- `Forward.prefill`: the admitted rows' prompts, packed, a prefill group per
  forward pass (a shared prefix once, before its first rows; then each row's
  own suffix);
- `Forward.decode`: one token for every row still generating;
- `sample_and_stop`: masks, sampling, logprobs, and which rows stop.

Rows that have stopped leave the batch (later forward passes compute only the
rows still generating, counted in `decode_slots`), and with fewer KV-cache
slots than rows their slots go to waiting rows. An optional constraint
(structured outputs) masks each step's logits; its masks are computed while
the model runs the forward pass.

A row may ask, when it finishes, for continuations to be scored after some of
its generated tokens (`Continuations`: the labels a classifier could have named
there). Its slot is held until then and its own KV read in place of a prefill
(`engine.score`); rows waiting on scoring are scored together, when their slots
are wanted or the run ends.

Rows named in a `SharedPrefix` begin with the same tokens: the prefix is
prefilled once, its KV stored once (`kv_cache.PrefixKV`), and every decode step
reads it once for all its rows (cascade attention, `engine.attend`).
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ossbatch.engine.kv_cache import KVCache, PrefixKV
from ossbatch.engine.model import Transformer
from ossbatch.engine.sampling import adjust_logits, sample
from ossbatch.engine.score import score_after_prefixes
from ossbatch.engine.step import Step, packed


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None
    cached_prompt_tokens: int = 0  # prompt tokens read from a shared prefix, not computed for this row
    # Per generated token, the row's K most likely (token id, logprob) under the raw distribution.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Per candidate of the row's `Continuations`, its summed logprob (raw distribution).
    continuation_logprobs: list[float] | None = None


@dataclass(frozen=True)
class Continuations:
    """Token sequences to score, teacher-forced, after a finished row's prompt and its first
    `after` generated tokens."""

    after: int
    candidates: list[list[int]]


@dataclass(frozen=True)
class SharedPrefix:
    """Rows whose prompts begin with the same `length` tokens."""

    rows: tuple[int, ...]
    length: int


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_computed: int = 0  # prompt tokens run through the model (a shared prefix counts once)
    kv_cache_bytes: int = 0  # the KV cache held: the slots and one copy of each shared prefix
    kv_bytes_saved: int = 0  # what a cache without sharing would hold for these rows, less kv_cache_bytes
    padded_prompt_slots: int = 0  # B x longest prompt: what a padded prefill would hold
    decode_slots: int = 0  # rows x decode steps actually computed
    steps: int = 0
    seconds: float = 0.0
    scoring_seconds: float = 0.0  # of `seconds`: scoring finished rows' continuations


class TokenConstraint(Protocol):
    """Per-row token masks for the rows of a generate() call (see pipeline.constrain.BatchConstraint).
    `rows` are the rows in this step, in the order of the step's logits."""

    def prepare(self, rows: list[int]) -> None: ...  # start computing their masks (may run in a thread)

    def apply(self, logits: torch.Tensor, rows: list[int]) -> None: ...  # [len(rows), V]: disallowed -> -inf, in place

    def advance(self, tokens: torch.Tensor, rows: list[int]) -> None: ...  # the rows' sampled tokens


@dataclass
class RowSettings:
    """Every row's sampling settings, as tensors indexed by row."""

    params: list[SamplingParams]
    temperature: torch.Tensor = field(init=False)
    top_p: torch.Tensor = field(init=False)
    seeds: torch.Tensor = field(init=False)
    max_tokens: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.temperature = torch.tensor([p.temperature for p in self.params], dtype=torch.float32)
        self.top_p = torch.tensor([p.top_p for p in self.params], dtype=torch.float64)
        self.seeds = torch.tensor([p.seed for p in self.params], dtype=torch.int64)
        self.max_tokens = torch.tensor([p.max_tokens for p in self.params], dtype=torch.int64)
        self.presence = torch.tensor([p.presence_penalty for p in self.params], dtype=torch.float32)
        self.frequency = torch.tensor([p.frequency_penalty for p in self.params], dtype=torch.float32)
        entries = [(row, int(t), float(v)) for row, p in enumerate(self.params) for t, v in p.logit_bias.items()]
        self.bias = (torch.tensor([e[0] for e in entries], dtype=torch.int64), torch.tensor([e[1] for e in entries], dtype=torch.int64),
                     torch.tensor([e[2] for e in entries], dtype=torch.float32))


class SlotScheduler:
    """Rows waiting for, and holding, the KV cache's slots.

    Rows are admitted in `order` into the lowest free slots. While others
    decode, rows wait until at least an eighth of the slots are free (or as
    many as are still waiting), so each refill prefill is a batch, not a row.
    """

    def __init__(self, order: list[int], rows: int, slots: int):
        self.waiting = deque(order)
        self.free_slots = list(range(slots))
        self.slot_of = torch.full((rows,), -1, dtype=torch.int64)
        self.refill_at = 1 if slots == rows else max(1, slots // 8)

    def admit(self, decoding: int) -> list[int]:
        """Waiting rows that take free slots now, given how many rows are decoding."""
        if not self.would_admit(decoding, 0):
            return []
        waiting, free = self.waiting, self.free_slots
        free.sort()
        rows = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        for row in rows:
            self.slot_of[row] = free.pop(0)
        return rows

    def would_admit(self, decoding: int, freeing: int) -> bool:
        """Whether `admit` would take rows if `freeing` more slots were free."""
        free = len(self.free_slots) + freeing
        return bool(self.waiting) and free > 0 and not (decoding and free < min(self.refill_at, len(self.waiting)))

    def free(self, rows: list[int]) -> None:
        self.free_slots.extend(int(self.slot_of[row]) for row in rows)

    def in_slot_order(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[torch.argsort(self.slot_of[rows])]  # Step.build wants sorted cache rows


class Forward:
    """The model over one KV cache of `slots` rows and the shared prefixes' store; each step's
    logits land in one buffer (allocating [rows, V] afresh every step costs page faults),
    admitted rows first."""

    def __init__(self, model: Transformer, slots: int, max_len: int, prefixes: list[list[int]]):
        self.model, self.slots, self.prefixes = model, slots, prefixes
        self.cache = KVCache.for_model(model.config, slots, max_len, model.dtype, model.device)
        self.kv_len = torch.zeros(slots, dtype=torch.int64)  # per slot: valid cache length after this step
        self.logits = torch.empty(slots, model.config.vocab_size, dtype=torch.float32, device=model.device)
        model.note_buffers(kv_cache=self.cache.nbytes, logits=self.logits.nbytes)
        self.prefix_len = self.prefix_of = None  # per slot, once rows share prefixes: the prefix's length and id
        self.root = _common_root(prefixes)  # what every prefix begins with: prefilled once, stored as prefix id len(prefixes)
        if prefixes:
            stored = prefixes + ([self.root] if self.root else [])
            parents = [len(prefixes) if self.root else -1] * len(prefixes) + ([-1] if self.root else [])
            self.cache.prefix = PrefixKV(model.config, [len(p) for p in stored], model.dtype, model.device, parents)
            self.prefix_ready = [False] * len(stored)
            self.prefix_len = torch.zeros(slots, dtype=torch.int64)
            self.prefix_of = torch.full((slots,), -1, dtype=torch.int64)
        self.computed = 0  # prompt tokens run through the model

    def prefill(self, chunks: list[tuple[torch.Tensor, list[list[int]], list[int]]]) -> int:
        """Each chunk (its rows' slots, their prompts, their prefix ids or -1) runs packed in one
        forward pass, after the prefixes it needs; logits at each row's last prompt token.
        Returns the padded prompt slots (rows x longest prompt computed)."""
        done = padded = 0
        for slots, prompts, prefix_ids in chunks:
            offsets = [len(self.prefixes[p]) if p >= 0 else 0 for p in prefix_ids]
            if self.prefixes:
                padded += self._prefill_prefixes(sorted({p for p in prefix_ids if p >= 0 and not self.prefix_ready[p]}))
                self.prefix_len[slots] = torch.tensor(offsets, dtype=torch.int64)
                self.prefix_of[slots] = torch.tensor(prefix_ids, dtype=torch.int64)
            tokens, positions, lengths = packed([p[n:] for p, n in zip(prompts, offsets)], offsets)
            self.kv_len[slots] = lengths
            step = Step.build(torch.repeat_interleave(slots, lengths), positions, self.kv_len, self.slots, self.prefix_len,
                              self.prefix_of, self._prefix_parents)
            self.model.forward(tokens, step, self.cache, torch.cumsum(lengths, 0) - 1, out=self.logits[done : done + len(prompts)])
            padded += len(prompts) * int(lengths.max())
            self.computed += int(lengths.sum())
            done += len(prompts)
        return padded

    def _prefill_prefixes(self, ids: list[int]) -> int:
        """Prefills the prefixes in a cache of their own, then keeps one copy of what rows will read.
        With a common root, the root is prefilled once and stored once; each prefix computes and
        stores only what follows it, and reads the root's copy (a job-wide header above each
        prompt's n samples).
        Returns the padded prompt slots."""
        if not ids:
            return 0
        padded = 0
        root_id = len(self.prefixes) if self.root else None
        if root_id is not None and not self.prefix_ready[root_id]:
            padded += self._prefill_into_store([root_id], [self.root])
        offset = len(self.root)
        return padded + self._prefill_into_store(ids, [self.prefixes[p][offset:] for p in ids], root_id)

    def _prefill_into_store(self, ids: list[int], own: list[list[int]], parent: int | None = None) -> int:
        """Prefills `own` (each prefix's tokens past its parent's) in a scratch cache, attending to the
        parent's stored KV, and stores them (the parent's keys stay the parent's). Returns the padded
        prompt slots."""
        offset = int(self.cache.prefix.lengths[parent]) if parent is not None else 0
        tokens, positions, lengths = packed(own, [offset] * len(own))
        scratch = KVCache.for_model(self.model.config, len(ids), int(lengths.max()), self.model.dtype, self.model.device)
        rows = torch.arange(len(ids))
        if parent is None:
            step = Step.build(torch.repeat_interleave(rows, lengths), positions, lengths, len(ids))
        else:
            scratch.prefix = self.cache.prefix
            step = Step.build(torch.repeat_interleave(rows, lengths), positions, lengths, len(ids),
                              torch.full((len(ids),), offset), torch.full((len(ids),), parent), self._prefix_parents)
        self.model.forward(tokens, step, scratch, torch.cumsum(lengths, 0) - 1)
        self.cache.prefix.store(ids, scratch)
        self.computed += int(lengths.sum())
        for p in ids:
            self.prefix_ready[p] = True
        return len(ids) * int(lengths.max())

    def score(self, slots: list[int], context_lengths: list[int], last_tokens: list[int],
              candidates: list[list[list[int]]]) -> list[list[float]]:
        """Each candidate's summed logprob after its slot's first `context_lengths` tokens (prompt,
        then generated), whose last is `last_tokens`: the tokens before it are in the slot (and the
        shared prefixes it read) already, so they are copied into a prefix store, not computed again."""
        store = PrefixKV(self.model.config, [n - 1 for n in context_lengths], self.model.dtype, self.model.device)
        prefix_ids = self.prefix_of[slots].tolist() if self.prefix_of is not None else [-1] * len(slots)
        store.gather(list(range(len(slots))), self.cache, slots, self.cache.prefix, prefix_ids)
        self.model.ensure_positions(max(n + len(c) for n, cs in zip(context_lengths, candidates) for c in cs))
        return score_after_prefixes(self.model, store, last_tokens, candidates)

    def decode(self, slots: torch.Tensor, tokens: torch.Tensor, first: int) -> None:
        """One token for each of `slots` (sorted); logits into rows first.. of the buffer."""
        positions = self.kv_len[slots].clone()
        if self.prefix_len is not None:
            positions += self.prefix_len[slots]
        self.kv_len[slots] += 1
        step = Step.build(slots, positions, self.kv_len, self.slots, self.prefix_len, self.prefix_of, self._prefix_parents)
        self.model.forward(tokens, step, self.cache, torch.arange(slots.numel()), out=self.logits[first : first + slots.numel()])

    @property
    def _prefix_parents(self) -> torch.Tensor | None:
        return self.cache.prefix.parents if self.cache.prefix is not None else None


class Outputs:
    """What each row has generated so far, and why it finished."""

    def __init__(self, rows: int, max_tokens: int, logprobs: bool, top_logprobs: list[int] | None = None,
                 masked: bool = False):
        self.tokens = torch.zeros(rows, max_tokens, dtype=torch.int64)
        self.logprobs = torch.zeros(rows, max_tokens, dtype=torch.float32) if logprobs else None
        # Top-K alternatives: every row records the largest K asked, each row keeps its own K.
        self.masked = masked  # logprobs under the constraint's masked distribution, not the raw one
        self.top_k = top_logprobs or [0] * rows
        self.top = max(self.top_k, default=0)
        self.top_ids = torch.zeros(rows, max_tokens, self.top, dtype=torch.int64) if self.top else None
        self.top_values = torch.zeros(rows, max_tokens, self.top, dtype=torch.float32) if self.top else None
        self.count = torch.zeros(rows, dtype=torch.int64)
        self.last_token = torch.zeros(rows, dtype=torch.int64)
        self.finish = [""] * rows

    def completions(self, cached_prompt_tokens: list[int]) -> list[Completion]:
        return [
            Completion(
                token_ids=self.tokens[row, :n].tolist(),
                finish_reason=self.finish[row],
                logprobs=self.logprobs[row, :n].tolist() if self.logprobs is not None else None,
                cached_prompt_tokens=cached_prompt_tokens[row],
                top_logprobs=self._top(row, n),
            )
            for row, n in enumerate(self.count.tolist())
        ]

    def _top(self, row: int, n: int) -> list[list[tuple[int, float]]] | None:
        k = self.top_k[row]
        if not k:
            return None
        ids, values = self.top_ids[row, :n, :k].tolist(), self.top_values[row, :n, :k].tolist()
        # Under a mask, fewer than K tokens may be allowed: the forbidden ones (-inf) are left out.
        return [[(t, x) for t, x in zip(i, v) if x != float("-inf")] for i, v in zip(ids, values)]


class ScoringQueue:
    """Finished rows whose `Continuations` are still to be scored: each keeps its KV slot until
    then. `score` runs them together (chunked so the copies of their contexts stay within half the
    cache) and frees their slots."""

    def __init__(self, ask: Callable[[int, list[int], str], Continuations | None], forward: Forward,
                 scheduler: SlotScheduler, prompts: list[list[int]], outputs: Outputs):
        self.ask, self.forward, self.scheduler, self.prompts, self.outputs = ask, forward, scheduler, prompts, outputs
        self.held: list[tuple[int, Continuations]] = []
        self.scores: dict[int, list[float]] = {}
        self.seconds = 0.0

    def finish(self, rows: list[int]) -> None:
        """Rows that just ended: those with continuations to score are held, the rest freed."""
        freed = []
        for row in rows:
            count = int(self.outputs.count[row])
            wanted = self.ask(row, self.outputs.tokens[row, :count].tolist(), self.outputs.finish[row])
            if wanted is None:
                freed.append(row)
                continue
            vocab = self.forward.model.config.vocab_size
            if (not 0 <= wanted.after <= count or not wanted.candidates or not all(wanted.candidates)
                    or not all(0 <= t < vocab for c in wanted.candidates for t in c)):
                raise ValueError(f"row {row}: continuations need 0 <= after <= {count} generated tokens and "
                                 f"non-empty candidates of token ids below {vocab}, got after={wanted.after}")
            self.held.append((row, wanted))
        self.scheduler.free(freed)

    def score(self) -> None:
        started, budget = time.perf_counter(), self.forward.slots * self.forward.cache.max_len // 2
        while self.held:
            chunk, tokens = [], 0
            while self.held and (not chunk or tokens + self._context_length(*self.held[0]) <= budget):
                chunk.append(self.held.pop(0))
                tokens += self._context_length(*chunk[-1])
            rows = [row for row, _ in chunk]
            lengths = [self._context_length(row, wanted) for row, wanted in chunk]
            last = [self._token(row, n - 1) for row, n in zip(rows, lengths)]
            scores = self.forward.score(self.scheduler.slot_of[rows].tolist(), lengths, last,
                                        [wanted.candidates for _, wanted in chunk])
            self.scores.update(zip(rows, scores))
            self.scheduler.free(rows)
        self.seconds += time.perf_counter() - started

    def _context_length(self, row: int, wanted: Continuations) -> int:
        return len(self.prompts[row]) + wanted.after

    def _token(self, row: int, position: int) -> int:
        prompt = self.prompts[row]
        return prompt[position] if position < len(prompt) else int(self.outputs.tokens[row, position - len(prompt)])


def sample_and_stop(logits: torch.Tensor, live: torch.Tensor, settings: RowSettings, outputs: Outputs, stops: torch.Tensor,
                    constraint: TokenConstraint | None, masked_buffer: torch.Tensor | None) -> torch.Tensor:
    """Samples a token for each `live` row from its logits (masked by the constraint), records it
    (with its logprob, and its top alternatives, under the unmasked distribution, or the masked one
    renormalised when `outputs.masked`) and returns which rows ended."""
    raw = logits  # the model's distribution, before any mask
    # Under a constraint the logits to mask are copied into its buffer, once, adjusted there.
    logits = adjust_logits(logits, live, settings.presence, settings.frequency, settings.bias, outputs.tokens, outputs.count,
                           out=masked_buffer[: live.numel()] if constraint is not None else None)
    if constraint is not None:
        constraint.apply(logits, live.tolist())
    scored = logits if outputs.masked else raw  # the distribution the logprobs are recorded under
    log_normalizer = torch.logsumexp(scored, dim=-1) if outputs.logprobs is not None or outputs.top else None
    if outputs.top:
        values, ids = scored.topk(outputs.top, dim=-1)
        top_values, top_ids = (values - log_normalizer[:, None]).cpu(), ids.cpu()
    count = outputs.count[live]
    on_device = lambda t: t.to(logits.device)  # noqa: E731
    next_tokens = sample(logits, on_device(settings.temperature[live]), on_device(settings.top_p[live]),
                         on_device(settings.seeds[live]), on_device(count))
    if outputs.logprobs is not None:
        outputs.logprobs[live, count] = (scored.gather(1, next_tokens[:, None]).flatten() - log_normalizer).cpu()
    if outputs.top:
        outputs.top_values[live, count], outputs.top_ids[live, count] = top_values, top_ids
    next_tokens = next_tokens.cpu()
    outputs.tokens[live, count] = next_tokens
    outputs.last_token[live] = next_tokens
    outputs.count[live] += 1
    if constraint is not None:
        constraint.advance(next_tokens, rows=live.tolist())

    stopped = torch.isin(next_tokens, stops)
    ended = stopped | (outputs.count[live] >= settings.max_tokens[live])
    for row, is_stop in zip(live[ended].tolist(), stopped[ended].tolist()):
        outputs.finish[row] = "stop" if is_stop else "length"
    return ended


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    stop_token_ids: list[int],
    constraint: TokenConstraint | None = None,
    logprobs: bool = False,
    prefill_groups: list[list[int]] | None = None,
    slots: int | None = None,
    shared_prefixes: list[SharedPrefix] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    top_logprobs: int | list[int] = 0,
    masked_logprobs: bool = False,
    continuations: Callable[[int, list[int], str], Continuations | None] | None = None,
) -> tuple[list[Completion], GenerationStats]:
    """Generates every row; returns completions in row order.

    `prefill_groups` partitions the rows into groups of similar prompt length
    that prefill in separate forward passes (so attention's padded rectangle
    stays small) before decoding together (so the batch stays wide).

    `slots` (default: one per row) is the number of KV-cache rows. With fewer
    slots than rows, rows are admitted in group order as slots free up: a row
    that stops hands its slot to the next waiting row, so the decode batch
    stays full while rows finish at different lengths (see `SlotScheduler`).

    `shared_prefixes` name rows whose prompts begin with the same tokens: each
    prefix is prefilled once and stored once, and its rows compute only the
    rest of their prompts. A prefix is used up to one token short of its
    shortest row's prompt (a row's last prompt token gives its first logits).

    `top_logprobs` (one K for every row, or a K per row) records, per generated token, the K most
    likely token ids and their logprobs under the model's raw distribution (as `logprobs`: before
    any constraint's mask, at temperature 1); with `masked_logprobs`, both are under the constraint's
    masked distribution instead (renormalised over the allowed tokens, still at temperature 1).

    `continuations(row, generated tokens, finish reason)`, if given, is asked as each row finishes
    which token sequences to score after its prompt and some of its generated tokens (or None);
    their summed logprobs (raw distribution) come back as the completion's `continuation_logprobs`.
    They are computed from the row's own KV before its slot is reused: no context is prefilled again.

    `on_step(rows_finished, tokens)`, if given, hears after every step how many rows stopped and
    how many tokens were generated in it (for live progress).
    """
    started = time.perf_counter()
    batch = len(prompts)
    slots = batch if slots is None else slots
    if not 1 <= slots <= batch:
        raise ValueError(f"slots must be from 1 to the number of rows ({batch}), got {slots}")
    settings = RowSettings(params)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    if bool((prompt_len == 0).any()) or bool((settings.max_tokens <= 0).any()):
        raise ValueError("every row needs a non-empty prompt and max_tokens >= 1")
    groups = [sorted(g) for g in prefill_groups] if prefill_groups else [list(range(batch))]
    if sorted(row for g in groups for row in g) != list(range(batch)):
        raise ValueError("prefill_groups must partition the rows")
    group_of = {row: n for n, g in enumerate(groups) for row in g}
    prefixes, prefix_of = _shared_prefixes(shared_prefixes or [], prompts)
    cached = [len(prefixes[p]) if p >= 0 else 0 for p in prefix_of]

    unshared_len = int((prompt_len + settings.max_tokens).max())
    model.ensure_positions(unshared_len)
    forward = Forward(model, slots, int((prompt_len - torch.tensor(cached) + settings.max_tokens).max()), prefixes)
    scheduler = SlotScheduler([row for g in groups for row in g], batch, slots)
    top_k = [top_logprobs] * batch if isinstance(top_logprobs, int) else list(top_logprobs)
    if len(top_k) != batch or any(k < 0 or k > model.config.vocab_size for k in top_k):
        raise ValueError(f"top_logprobs must be one K, or a K per row, from 0 to the vocabulary size; got {top_logprobs}")
    outputs = Outputs(batch, int(settings.max_tokens.max()), logprobs, top_k, masked_logprobs)
    stats = GenerationStats(prompt_tokens=int(prompt_len.sum()))
    stops = torch.tensor(sorted(stop_token_ids), dtype=torch.int64)
    masked_buffer = torch.empty_like(forward.logits) if constraint is not None else None
    decoding = torch.zeros(0, dtype=torch.int64)  # rows that decode this step, in slot order
    scoring = ScoringQueue(continuations, forward, scheduler, prompts, outputs) if continuations is not None else None

    while True:
        if scoring is not None and scoring.held and scheduler.would_admit(decoding.numel(), len(scoring.held)):
            scoring.score()  # their slots are wanted now
        admitted = scheduler.admit(decoding.numel())
        live = torch.cat([torch.tensor(admitted, dtype=torch.int64), decoding])  # the rows in this step's logits
        if constraint is not None:
            constraint.prepare(live.tolist())  # masks computed while the forward passes run
        chunks: dict[int, list[int]] = {}
        for row in admitted:
            chunks.setdefault(group_of[row], []).append(row)
        stats.padded_prompt_slots += forward.prefill(
            [(scheduler.slot_of[c], [prompts[r] for r in c], [prefix_of[r] for r in c]) for c in chunks.values()])
        if decoding.numel():
            forward.decode(scheduler.slot_of[decoding], outputs.last_token[decoding], first=len(admitted))
            stats.decode_slots += decoding.numel()
        stats.steps += 1
        ended = sample_and_stop(forward.logits[: live.numel()], live, settings, outputs, stops, constraint, masked_buffer)
        if scoring is not None:
            scoring.finish(live[ended].tolist())
        else:
            scheduler.free(live[ended].tolist())
        decoding = scheduler.in_slot_order(live[~ended])
        if on_step is not None:
            on_step(int(ended.sum()), live.numel())
        if not decoding.numel() and not scheduler.waiting:
            break
    if scoring is not None:
        scoring.score()
        stats.scoring_seconds = scoring.seconds

    stats.seconds = time.perf_counter() - started
    stats.prompt_computed, stats.kv_cache_bytes = forward.computed, forward.cache.nbytes
    per_slot_token = sum(t[0, 0].numel() * t.element_size() for t in forward.cache.k + forward.cache.v)
    stats.kv_bytes_saved = max(0, slots * unshared_len * per_slot_token - stats.kv_cache_bytes)
    completions = outputs.completions(cached)
    for row, scores in (scoring.scores.items() if scoring is not None else ()):
        completions[row].continuation_logprobs = scores
    return completions, stats


MIN_ROOT_TOKENS = 16  # a shorter common root is not worth a prefill of its own


def _common_root(prefixes: list[list[int]]) -> list[int]:
    """The tokens every prefix begins with, kept one token short of the shortest (each prefix
    computes at least one token of its own); empty when there is nothing worth sharing."""
    if len(prefixes) < 2:
        return []
    first, length = prefixes[0], min(len(p) for p in prefixes) - 1
    for other in prefixes[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return first[:length] if length >= MIN_ROOT_TOKENS else []


def _shared_prefixes(shared: list[SharedPrefix], prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The prefixes to prefill (each cut to one token short of its shortest row's prompt) and each
    row's prefix id (-1: none). A prefix of one row, or of no tokens once cut, is not shared."""
    prefixes: list[list[int]] = []
    prefix_of = [-1] * len(prompts)
    for n, group in enumerate(shared):
        rows = list(group.rows)
        for row in rows:
            if not 0 <= row < len(prompts):
                raise ValueError(f"shared_prefixes[{n}]: row {row} is not a row of this batch")
            if prefix_of[row] != -1 or rows.count(row) > 1:
                raise ValueError(f"shared_prefixes[{n}]: row {row} is named by more than one shared prefix")
            if group.length > len(prompts[row]) or prompts[row][: group.length] != prompts[rows[0]][: group.length]:
                raise ValueError(f"shared_prefixes[{n}]: row {row}'s prompt does not begin with the prefix's {group.length} tokens")
        length = min([group.length] + [len(prompts[row]) - 1 for row in rows])
        if len(rows) < 2 or length < 1:
            continue
        for row in rows:
            prefix_of[row] = len(prefixes)
        prefixes.append(prompts[rows[0]][:length])
    return prefixes, prefix_of
