"""The generation loop for one static batch: prefill, then decode until every
row stops on a stop token or reaches its max tokens.

Rows that have stopped leave the batch: later forward passes compute only the
rows still generating (counted in `decode_slots`).  An optional constraint
(structured outputs) masks each step's logits; its masks are computed while
the model runs the forward pass.
"""

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.kv_cache import KVCache
from engine.model import Step, Transformer
from engine.sampling import sample


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
    """Per-row token masks for one batch (see pipeline.constrain.BatchConstraint)."""

    def prepare(self) -> None: ...  # start computing the next step's masks (may run in a thread)

    def apply(self, logits: torch.Tensor) -> None: ...  # [B, V]: set disallowed tokens to -inf in place

    def advance(self, tokens: torch.Tensor, active: torch.Tensor) -> None: ...


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
) -> tuple[list[Completion], GenerationStats]:
    """`prefill_groups` partitions the rows into groups of similar prompt length
    that prefill in separate forward passes (so attention's padded rectangle
    stays small) before every row decodes together (so the batch stays wide)."""
    started = time.perf_counter()
    batch = len(prompts)
    settings = _Batch(params)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    if bool((prompt_len == 0).any()) or bool((settings.max_tokens <= 0).any()):
        raise ValueError("every row needs a non-empty prompt and max_tokens >= 1")
    max_len = int((prompt_len + settings.max_tokens).max())
    model.ensure_positions(max_len)
    cache = KVCache.for_model(model.config, batch, max_len, model.dtype, model.device)
    stops = torch.tensor(sorted(stop_token_ids), dtype=torch.int64)
    groups = [sorted(g) for g in prefill_groups] if prefill_groups else [list(range(batch))]
    if sorted(row for g in groups for row in g) != list(range(batch)):
        raise ValueError("prefill_groups must partition the rows")
    stats = GenerationStats(
        prompt_tokens=int(prompt_len.sum()),
        padded_prompt_slots=sum(len(g) * int(prompt_len[g].max()) for g in groups),
    )
    kv_len = prompt_len.clone()
    # Logits land in one buffer for the whole batch: allocating [B, V] afresh every step costs page faults.
    logits_buffer = torch.empty(batch, model.config.vocab_size, dtype=torch.float32, device=model.device)
    masked_buffer = torch.zeros_like(logits_buffer) if constraint is not None else None

    def prefill() -> torch.Tensor:
        """Every prompt token, packed, a group per forward pass; logits at each row's last token."""
        done = 0
        for group in groups:
            lengths = prompt_len[group]
            tokens = torch.tensor([t for row in group for t in prompts[row]], dtype=torch.int64)
            rows = torch.repeat_interleave(torch.tensor(group), lengths)
            positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
            step = Step.build(rows, positions, kv_len, batch)
            model.forward(tokens, step, cache, torch.cumsum(lengths, 0) - 1, out=logits_buffer[done : done + len(group)])
            done += len(group)
        order = [row for g in groups for row in g]
        if order == sorted(order):  # groups of consecutive rows (as the pipeline builds them): no reordering copy
            return logits_buffer
        return logits_buffer[torch.argsort(torch.tensor(order)).to(model.device)]

    generated = torch.zeros(batch, max_len, dtype=torch.int64)
    token_logprobs = torch.zeros(batch, max_len, dtype=torch.float32) if logprobs else None
    count = torch.zeros(batch, dtype=torch.int64)
    finish = [""] * batch
    active = torch.ones(batch, dtype=torch.bool)
    live = torch.arange(batch)  # the rows in this step's logits, in order

    while True:
        if constraint is not None:
            constraint.prepare()
        if stats.steps == 0:
            logits = prefill()
        else:
            logits = model.forward(tokens, Step.build(rows, positions, kv_len, batch), cache, logits_at,
                                   out=logits_buffer[: live.numel()])
        stats.steps += 1
        raw = logits  # the model's distribution, before any mask
        log_normalizer = torch.logsumexp(raw, dim=-1) if logprobs else None
        if constraint is not None:
            # Rows that left the batch keep stale logits here; their masks are computed and never read.
            masked_buffer[live] = logits
            constraint.apply(masked_buffer)
            logits = masked_buffer[live]
        on_device = lambda t: t.to(logits.device)  # noqa: E731
        next_tokens = sample(logits, on_device(settings.temperature[live]), on_device(settings.top_p[live]),
                             on_device(settings.seeds[live]), on_device(count[live]))
        if logprobs:
            token_logprobs[live, count[live]] = (raw.gather(1, next_tokens[:, None]).flatten() - log_normalizer).cpu()
        next_tokens = next_tokens.cpu()
        generated[live, count[live]] = next_tokens
        count[live] += 1
        if constraint is not None:
            sampled = torch.zeros(batch, dtype=torch.int64)
            sampled[live] = next_tokens
            constraint.advance(sampled, active.clone())

        stopped = torch.isin(next_tokens, stops)
        exhausted = count[live] >= settings.max_tokens[live]
        for row, is_stop in zip(live[stopped | exhausted].tolist(), stopped[stopped | exhausted].tolist()):
            finish[row] = "stop" if is_stop else "length"
        active[live[stopped | exhausted]] = False
        if not bool(active.any()):
            break

        # Decode: one token for each row still generating, at the end of its sequence.
        keep = ~(stopped | exhausted)
        tokens = next_tokens[keep]
        live = live[keep]
        rows, positions = live, kv_len[live].clone()
        kv_len[live] += 1
        logits_at = torch.arange(live.numel())
        stats.decode_slots += live.numel()

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
