"""The generation loop: prefill, then decode until every row stops on a stop
token or reaches its max tokens.

Rows that have stopped leave the batch (later forward passes compute only the
rows still generating, counted in `decode_slots`), and with fewer KV-cache
slots than rows their slots go to waiting rows. An optional constraint
(structured outputs) masks each step's logits; its masks are computed while
the model runs the forward pass.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ossbatch.engine.kv_cache import KVCache
from ossbatch.engine.model import Step, Transformer
from ossbatch.engine.sampling import sample


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    padded_prompt_slots: int = 0  # B x longest prompt: what a padded prefill would hold
    decode_slots: int = 0  # rows x decode steps actually computed
    steps: int = 0
    seconds: float = 0.0


class TokenConstraint(Protocol):
    """Per-row token masks for the rows of a generate() call (see pipeline.constrain.BatchConstraint).
    `rows` are the rows in this step, in the order of the step's logits."""

    def prepare(self, rows: list[int]) -> None: ...  # start computing their masks (may run in a thread)

    def apply(self, logits: torch.Tensor, rows: list[int]) -> None: ...  # [len(rows), V]: disallowed -> -inf, in place

    def advance(self, tokens: torch.Tensor, rows: list[int]) -> None: ...  # the rows' sampled tokens


@dataclass
class _Batch:
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
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[list[Completion], GenerationStats]:
    """Generates every row; returns completions in row order.

    `prefill_groups` partitions the rows into groups of similar prompt length
    that prefill in separate forward passes (so attention's padded rectangle
    stays small) before decoding together (so the batch stays wide).

    `slots` (default: one per row) is the number of KV-cache rows. With fewer
    slots than rows, rows are admitted in group order as slots free up: a row
    that stops hands its slot to the next waiting row, so the decode batch
    stays full while rows finish at different lengths. Rows wait until at
    least an eighth of the slots are free (or nothing else is decoding), so
    each refill prefill is a batch, not a row.

    `on_step(rows_finished, tokens)`, if given, hears after every step how many rows stopped and
    how many tokens were generated in it (for live progress).
    """
    started = time.perf_counter()
    batch = len(prompts)
    slots = batch if slots is None else slots
    if not 1 <= slots <= batch:
        raise ValueError(f"slots must be from 1 to the number of rows ({batch}), got {slots}")
    settings = _Batch(params)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    if bool((prompt_len == 0).any()) or bool((settings.max_tokens <= 0).any()):
        raise ValueError("every row needs a non-empty prompt and max_tokens >= 1")
    max_len = int((prompt_len + settings.max_tokens).max())
    model.ensure_positions(max_len)
    cache = KVCache.for_model(model.config, slots, max_len, model.dtype, model.device)
    stops = torch.tensor(sorted(stop_token_ids), dtype=torch.int64)
    groups = [sorted(g) for g in prefill_groups] if prefill_groups else [list(range(batch))]
    if sorted(row for g in groups for row in g) != list(range(batch)):
        raise ValueError("prefill_groups must partition the rows")
    stats = GenerationStats(prompt_tokens=int(prompt_len.sum()))
    group_of = {row: n for n, g in enumerate(groups) for row in g}
    waiting = deque(row for g in groups for row in g)
    free_slots = list(range(slots))
    slot_of = torch.full((batch,), -1, dtype=torch.int64)
    kv_len = torch.zeros(slots, dtype=torch.int64)  # per slot: valid cache length after this step
    refill_at = 1 if slots == batch else max(1, slots // 8)
    # Logits land in one buffer: allocating [rows, V] afresh every step costs page faults.
    logits_buffer = torch.empty(slots, model.config.vocab_size, dtype=torch.float32, device=model.device)
    masked_buffer = torch.empty_like(logits_buffer) if constraint is not None else None

    def admit(decoding: int) -> list[int]:
        """Waiting rows that take free slots now, in group order (lowest slots first)."""
        if not waiting or not free_slots or (decoding and len(free_slots) < min(refill_at, len(waiting))):
            return []
        free_slots.sort()
        rows = [waiting.popleft() for _ in range(min(len(free_slots), len(waiting)))]
        for row in rows:
            slot_of[row] = free_slots.pop(0)
        return rows

    def prefill(rows: list[int]) -> None:
        """The admitted rows' prompts, packed, a group per forward pass; logits at each row's last token."""
        done = 0
        chunks: dict[int, list[int]] = {}
        for row in rows:
            chunks.setdefault(group_of[row], []).append(row)
        for chunk in chunks.values():
            lengths = prompt_len[chunk]
            chunk_slots = slot_of[chunk]
            kv_len[chunk_slots] = lengths
            tokens = torch.tensor([t for row in chunk for t in prompts[row]], dtype=torch.int64)
            positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
            step = Step.build(torch.repeat_interleave(chunk_slots, lengths), positions, kv_len, slots)
            model.forward(tokens, step, cache, torch.cumsum(lengths, 0) - 1, out=logits_buffer[done : done + len(chunk)])
            stats.padded_prompt_slots += len(chunk) * int(lengths.max())
            done += len(chunk)

    generated = torch.zeros(batch, int(settings.max_tokens.max()), dtype=torch.int64)
    token_logprobs = torch.zeros(batch, generated.shape[1], dtype=torch.float32) if logprobs else None
    count = torch.zeros(batch, dtype=torch.int64)
    last_token = torch.zeros(batch, dtype=torch.int64)
    finish = [""] * batch
    decoding = torch.zeros(0, dtype=torch.int64)  # rows that decode this step, in slot order

    while True:
        admitted = admit(decoding.numel())
        live = torch.cat([torch.tensor(admitted, dtype=torch.int64), decoding])  # the rows in this step's logits
        if constraint is not None:
            constraint.prepare(live.tolist())  # masks computed while the forward passes run
        prefill(admitted)
        if decoding.numel():
            decode_slots = slot_of[decoding]
            positions = kv_len[decode_slots].clone()
            kv_len[decode_slots] += 1
            n = len(admitted)
            model.forward(last_token[decoding], Step.build(decode_slots, positions, kv_len, slots), cache,
                          torch.arange(decoding.numel()), out=logits_buffer[n : n + decoding.numel()])
            stats.decode_slots += decoding.numel()
        logits = logits_buffer[: live.numel()]
        stats.steps += 1
        raw = logits  # the model's distribution, before any mask
        log_normalizer = torch.logsumexp(raw, dim=-1) if logprobs else None
        if constraint is not None:
            logits = masked_buffer[: live.numel()].copy_(logits)
            constraint.apply(logits, live.tolist())
        on_device = lambda t: t.to(logits.device)  # noqa: E731
        next_tokens = sample(logits, on_device(settings.temperature[live]), on_device(settings.top_p[live]),
                             on_device(settings.seeds[live]), on_device(count[live]))
        if logprobs:
            token_logprobs[live, count[live]] = (raw.gather(1, next_tokens[:, None]).flatten() - log_normalizer).cpu()
        next_tokens = next_tokens.cpu()
        generated[live, count[live]] = next_tokens
        last_token[live] = next_tokens
        count[live] += 1
        if constraint is not None:
            constraint.advance(next_tokens, rows=live.tolist())

        stopped = torch.isin(next_tokens, stops)
        ended = stopped | (count[live] >= settings.max_tokens[live])
        for row, is_stop in zip(live[ended].tolist(), stopped[ended].tolist()):
            finish[row] = "stop" if is_stop else "length"
            free_slots.append(int(slot_of[row]))
        # Rows still generating decode next step, in slot order (Step.build wants sorted cache rows).
        decoding = live[~ended]
        decoding = decoding[torch.argsort(slot_of[decoding])]
        if on_step is not None:
            on_step(int(ended.sum()), live.numel())
        if not decoding.numel() and not waiting:
            break

    stats.seconds = time.perf_counter() - started
    completions = []
    for row in range(batch):
        n = int(count[row])
        completions.append(
            Completion(
                token_ids=generated[row, :n].tolist(),
                finish_reason=finish[row],
                logprobs=token_logprobs[row, :n].tolist() if logprobs else None,
            )
        )
    return completions, stats
