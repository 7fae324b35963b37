"""GPU memory arithmetic for a static batch: what the weights take, what each
sequence's KV cache takes at `max_context`, what is held back as workspace, and
so the largest batch that fits.

Weights are counted as the released checkpoints store them: expert matrices in
MXFP4 (17 bytes per 32 values: 16 bytes of e2m1 pairs + one e8m0 scale, each
row padded to whole 32-value groups), everything else (expert biases,
attention, sinks, router, embeddings, lm_head, norms) in bf16.

KV cache: the kernels index a row's cache by token position (kernels/attention.py),
so by default every layer, sliding-window ones included, holds `max_context`
positions.  A ring buffer would let the windowed layers hold only
`sliding_window` positions; the plan states both and `ring_buffer_windowed_layers`
picks which the batch is sized with.

Shared prefixes (`shared_prefix_tokens`): rows that begin with the same
prompt tokens (a job's system + developer message) keep one copy of that
prefix's KV (engine/generate.py `SharedPrefix`): every layer stores it once, the
windowed layers only its last `sliding_window - 1` positions, and each
sequence holds only the tokens past it. The plan states the batch with and
without sharing.

Workspace reserve (an assumption, stated in the table):
  * `fixed_reserve_bytes` (default 1 GiB): CUDA context, cuBLAS/Triton
    workspaces, allocator fragmentation;
  * a prefill chunk of `prefill_chunk_tokens` tokens (default 8192) in flight,
    at the per-token activation bytes of one layer (residual in float32, normed
    input, q/k/v, attention output, router logits, the MoE's per-slot float32
    outputs and bf16 SwiGLU activations) - layers run one after another, so one
    layer's activations are live at a time;
  * per sequence, float32 logits twice over (logits and sampling probabilities).
"""

import math
import re
from dataclasses import dataclass

from ossbatch.engine.config import ModelConfig

GIB = 1 << 30
MXFP4_BYTES_PER_32 = 17
BF16 = 2
# Positions whose float32 [V] logits one teacher-forced scoring pass holds (engine/score.py): a
# row of gpt-oss's vocabulary is 0.8 MB.
SCORING_LOGIT_ROWS = 256


@dataclass(frozen=True)
class MemoryPlan:
    gpu_memory_bytes: int
    max_context: int
    dtype_bytes: int  # KV cache element size
    parameter_count: int
    weight_bytes_by_part: dict  # name -> bytes
    weight_bytes: int
    full_layers: int
    windowed_layers: int
    sliding_window: int
    kv_bytes_per_token_full_layers: int  # all full-attention layers, per cached token
    kv_bytes_per_token_windowed_layers: int  # all windowed layers, per token, when stored by position
    kv_bytes_windowed_fixed: int  # all windowed layers, per sequence, with a ring buffer
    ring_buffer_windowed_layers: bool
    kv_bytes_per_sequence: int  # at max_context, as the batch is sized
    fixed_reserve_bytes: int
    prefill_chunk_tokens: int
    prefill_workspace_bytes: int
    workspace_bytes_per_sequence: int
    max_batch: int  # 0: the weights and reserve alone do not fit
    shared_prefix_tokens: int = 0  # prompt tokens every sequence shares, stored once
    prefix_kv_bytes: int = 0  # the one copy of the shared prefix
    max_batch_unshared: int = 0  # the batch if every sequence held its own copy of the prefix
    # With label scoring (--label-field), finished rows' contexts are copied out of the KV cache (at
    # most half of it) and one scoring pass holds its logits (engine/score.py).
    scoring_bytes_per_sequence: int = 0
    scoring_fixed_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.max_batch > 0

    @property
    def reserve_bytes(self) -> int:
        return self.fixed_reserve_bytes + self.prefill_workspace_bytes + self.scoring_fixed_bytes

    @property
    def bytes_per_sequence(self) -> int:
        return self.kv_bytes_per_sequence + self.workspace_bytes_per_sequence + self.scoring_bytes_per_sequence

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.reserve_bytes + self.prefix_kv_bytes + self.max_batch * self.bytes_per_sequence


def weight_parameters(config: ModelConfig) -> dict:
    """Parameter counts per part, as the checkpoint stores them (experts unpadded)."""
    hidden, inter, experts, layers = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_hidden_layers
    q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = hidden * q_dim + q_dim + 2 * (hidden * kv_dim + kv_dim) + q_dim * hidden + hidden + config.num_attention_heads
    return {
        "experts (MXFP4)": layers * experts * (2 * inter * hidden + hidden * inter),
        "expert biases": layers * experts * (2 * inter + hidden),
        "attention + sinks": layers * attention,
        "router": layers * (hidden * experts + experts),
        "embeddings": config.vocab_size * hidden,
        "lm_head": config.vocab_size * hidden,
        "norms": (2 * layers + 1) * hidden,
    }


def expert_bytes(config: ModelConfig) -> int:
    """One expert of one layer: both MXFP4 matrices (rows padded to 32-value groups) and bf16 biases."""
    hidden, inter = config.hidden_size, config.intermediate_size
    mlp1 = 2 * inter * math.ceil(hidden / 32) * MXFP4_BYTES_PER_32
    mlp2 = hidden * math.ceil(inter / 32) * MXFP4_BYTES_PER_32
    return mlp1 + mlp2 + (2 * inter + hidden) * BF16


def weight_bytes_by_part(config: ModelConfig) -> dict:
    params = weight_parameters(config)
    sizes = {name: count * BF16 for name, count in params.items()}
    sizes["experts (MXFP4)"] = config.num_hidden_layers * config.num_local_experts * (
        expert_bytes(config) - (2 * config.intermediate_size + config.hidden_size) * BF16
    )
    return sizes


def activation_bytes_per_token(config: ModelConfig) -> int:
    """Live activations of one layer for one token in flight (see the module docstring)."""
    q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    k = config.num_experts_per_tok
    return (
        config.hidden_size * 4  # residual stream, float32
        + config.hidden_size * BF16  # normed input
        + (q_dim + 2 * kv_dim) * BF16  # q, k, v
        + q_dim * BF16  # attention output
        + config.num_local_experts * 4  # router logits
        + k * config.hidden_size * 4  # MoE per-slot outputs, float32
        + k * config.intermediate_size * BF16  # MoE SwiGLU activations
    )


def windowed_layers(config: ModelConfig) -> int:
    return sum(1 for layer in range(config.num_hidden_layers) if config.window(layer))


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> tuple[int, int]:
    """K and V bytes of one cached token: over the full-attention layers, over the windowed ones."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    windowed = windowed_layers(config)
    return (config.num_hidden_layers - windowed) * per_layer, windowed * per_layer


def label_scoring_copy_bytes(config: ModelConfig, cache_tokens: int, rows: int, dtype_bytes: int) -> int:
    """Label scoring's copies of finished rows' contexts out of a KV cache of `cache_tokens` positions
    over `rows` rows (engine.generate.ScoringQueue): at most half its positions in full-attention
    layers, the window's tail of each row in windowed ones."""
    kv_full, kv_windowed = kv_bytes_per_token(config, dtype_bytes)
    tail = min(max(config.sliding_window - 1, 0), cache_tokens)
    return kv_full * cache_tokens // 2 + rows * kv_windowed * tail


def label_scoring_logits_bytes(config: ModelConfig) -> int:
    """One scoring pass's float32 logits and their log-softmax temporary."""
    return 2 * SCORING_LOGIT_ROWS * config.vocab_size * 4


def plan_memory(
    config: ModelConfig,
    gpu_memory_bytes: int,
    max_context: int,
    dtype_bytes: int = 2,
    *,
    ring_buffer_windowed_layers: bool = False,
    fixed_reserve_bytes: int = GIB,
    prefill_chunk_tokens: int = 8192,
    shared_prefix_tokens: int = 0,
    label_scoring: bool = False,
) -> MemoryPlan:
    if gpu_memory_bytes <= 0 or max_context <= 0 or dtype_bytes <= 0:
        raise ValueError("gpu memory, max context and dtype bytes must be positive")
    if not 0 <= shared_prefix_tokens < max_context:
        raise ValueError(f"--shared-prefix-tokens must be from 0 to below the max context ({max_context}), got {shared_prefix_tokens}")
    sizes = weight_bytes_by_part(config)
    weights = sum(sizes.values())

    windowed = windowed_layers(config)
    full = config.num_hidden_layers - windowed
    kv_full, kv_windowed = kv_bytes_per_token(config, dtype_bytes)
    window_positions = min(config.sliding_window, max_context)
    kv_windowed_fixed = kv_windowed * window_positions
    windowed_per_sequence = kv_windowed_fixed if ring_buffer_windowed_layers else kv_windowed * max_context
    unshared_kv = kv_full * max_context + windowed_per_sequence
    own_tokens = max_context - shared_prefix_tokens
    own_windowed = kv_windowed * min(config.sliding_window, own_tokens) if ring_buffer_windowed_layers else kv_windowed * own_tokens
    per_sequence_kv = kv_full * own_tokens + own_windowed
    prefix_kv = kv_full * shared_prefix_tokens + kv_windowed * min(shared_prefix_tokens, max(config.sliding_window - 1, 0))

    prefill = min(prefill_chunk_tokens, max(max_context, 1)) * activation_bytes_per_token(config)
    per_sequence_workspace = 2 * config.vocab_size * 4
    scoring = label_scoring_copy_bytes(config, own_tokens, 1, dtype_bytes) if label_scoring else 0
    scoring_fixed = label_scoring_logits_bytes(config) if label_scoring else 0
    free = gpu_memory_bytes - weights - fixed_reserve_bytes - prefill - scoring_fixed
    per_sequence = per_sequence_kv + per_sequence_workspace + scoring
    max_batch = max((free - prefix_kv) // per_sequence, 0) if shared_prefix_tokens else max(free // per_sequence, 0)
    return MemoryPlan(
        gpu_memory_bytes=gpu_memory_bytes,
        max_context=max_context,
        dtype_bytes=dtype_bytes,
        parameter_count=sum(weight_parameters(config).values()),
        weight_bytes_by_part=sizes,
        weight_bytes=weights,
        full_layers=full,
        windowed_layers=windowed,
        sliding_window=config.sliding_window,
        kv_bytes_per_token_full_layers=kv_full,
        kv_bytes_per_token_windowed_layers=kv_windowed,
        kv_bytes_windowed_fixed=kv_windowed_fixed,
        ring_buffer_windowed_layers=ring_buffer_windowed_layers,
        kv_bytes_per_sequence=per_sequence_kv,
        fixed_reserve_bytes=fixed_reserve_bytes,
        prefill_chunk_tokens=prefill_chunk_tokens,
        prefill_workspace_bytes=prefill,
        workspace_bytes_per_sequence=per_sequence_workspace,
        max_batch=max_batch,
        shared_prefix_tokens=shared_prefix_tokens,
        prefix_kv_bytes=prefix_kv if shared_prefix_tokens else 0,
        max_batch_unshared=max(free // (unshared_kv + per_sequence_workspace
                                        + (label_scoring_copy_bytes(config, max_context, 1, dtype_bytes) if label_scoring else 0)), 0),
        scoring_bytes_per_sequence=scoring,
        scoring_fixed_bytes=scoring_fixed,
    )


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: MemoryPlan) -> str:
    rows = [("GPU memory", _size(plan.gpu_memory_bytes)), ("max context", f"{plan.max_context} tokens")]
    rows.append((f"weights ({plan.parameter_count / 1e9:.1f}B parameters)", _size(plan.weight_bytes)))
    rows += [(f"  {name}", _size(size)) for name, size in plan.weight_bytes_by_part.items()]
    rows.append((f"KV per token, {plan.full_layers} full-attention layers", _size(plan.kv_bytes_per_token_full_layers)))
    windowed = f"{plan.windowed_layers} sliding-window layers"
    rows.append((f"KV per token, {windowed} (stored by position)", _size(plan.kv_bytes_per_token_windowed_layers)))
    rows.append((f"KV fixed per sequence, {windowed} (ring buffer of {plan.sliding_window})", _size(plan.kv_bytes_windowed_fixed)))
    layout = "ring buffer for windowed layers" if plan.ring_buffer_windowed_layers else "every layer stored by position"
    held = f"{plan.max_context - plan.shared_prefix_tokens} own tokens" if plan.shared_prefix_tokens else str(plan.max_context)
    rows.append((f"KV per sequence at {held} ({layout})", _size(plan.kv_bytes_per_sequence)))
    if plan.shared_prefix_tokens:
        rows.append((f"KV of the shared prefix of {plan.shared_prefix_tokens} tokens, stored once", _size(plan.prefix_kv_bytes)))
    rows.append(("reserve: CUDA context, workspaces, fragmentation", _size(plan.fixed_reserve_bytes)))
    rows.append((f"reserve: prefill chunk of {plan.prefill_chunk_tokens} tokens", _size(plan.prefill_workspace_bytes)))
    rows.append(("workspace per sequence (float32 logits x2)", _size(plan.workspace_bytes_per_sequence)))
    if plan.scoring_fixed_bytes:
        rows.append(("label scoring: contexts copied, per sequence (at most)", _size(plan.scoring_bytes_per_sequence)))
        rows.append((f"label scoring: logits of one pass ({SCORING_LOGIT_ROWS} positions, x2)", _size(plan.scoring_fixed_bytes)))
    verdict = str(plan.max_batch) if plan.fits else "0 (weights and reserve do not fit)"
    rows.append(("largest static batch", verdict))
    if plan.shared_prefix_tokens:
        rows.append(("  without prefix sharing", str(plan.max_batch_unshared)))
    rows.append(("memory used at that batch", _size(plan.used_bytes)))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>14}" for label, value in rows)


def rows_by_context(config: ModelConfig, gpu_memory_bytes: int, shared_prefix_tokens: int = 0, dtype_bytes: int = 2,
                    contexts: list[int] | None = None, **options) -> list[tuple[int, MemoryPlan, MemoryPlan]]:
    """For each context (default: powers of two from 1024 to the model's context), the plans with
    every layer stored by position and with a ring buffer for the windowed layers: how many rows
    fit on one GPU, the shared prefix's KV counted once."""
    if contexts is None:
        contexts, n = [], 1024
        while n <= config.max_position_embeddings:
            contexts.append(n)
            n *= 2
    out = []
    for context in contexts:
        if context <= shared_prefix_tokens:
            continue
        by_position = plan_memory(config, gpu_memory_bytes, context, dtype_bytes, shared_prefix_tokens=shared_prefix_tokens, **options)
        ring = plan_memory(config, gpu_memory_bytes, context, dtype_bytes, ring_buffer_windowed_layers=True,
                           shared_prefix_tokens=shared_prefix_tokens, **options)
        out.append((context, by_position, ring))
    return out


def format_rows_by_context(rows: list[tuple[int, MemoryPlan, MemoryPlan]]) -> str:
    if not rows:
        return ""
    first = rows[0][1]
    shared = first.shared_prefix_tokens
    headers = ["context", "rows that fit", "rows, ring buffer for windowed layers"]
    if shared:
        headers += [f"without sharing the {shared}-token prefix", "ring buffer, without sharing"]
    lines = [f"Rows that fit on {_size(first.gpu_memory_bytes)} by context (each row holds up to the context; "
             + (f"the shared {shared}-token prefix's KV held once):" if shared else "no shared prefix):")]
    table = [headers] + [[str(context), str(plan.max_batch), str(ring.max_batch)]
                         + ([str(plan.max_batch_unshared), str(ring.max_batch_unshared)] if shared else [])
                         for context, plan, ring in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text, flag: str = "--gpu-memory") -> int:
    """'80GiB', '80GB', '81920MiB', '1.5GiB' or a plain byte count -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{flag}: cannot read {text!r} as a size; use e.g. 80GiB, 80GB, 81920MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


# What a CPU process's anonymous memory grows by once it generates, besides the buffers counted
# below: oneDNN's primitive cache (a compiled kernel per matmul shape: every expert's row count
# is a new shape) and small-allocation heap growth. Measured at 100-150 MiB on the 8-layer,
# 32-expert test model (tests/test_memory_budget.py), ~30 MiB at 20b widths.
RUNTIME_GROWTH_BYTES = 192 << 20


@dataclass(frozen=True)
class HostBudget:
    """How a CPU job's anonymous memory budget (--memory-budget) is spent: what the process holds
    once the model is loaded (libraries, tokenizer, weights copied out of the mapping), the batch's
    buffers at their largest (sized from --batch-tokens and --max-batch-rows), and the expert
    cache, which gets what is left up to its cap. The memory-mapped weights are file-backed and not
    part of it."""

    budget_bytes: int
    in_use_bytes: int  # the process's anonymous memory with the model loaded, its expert cache aside
    kv_bytes: int  # a full batch's KV cache: batch_tokens positions in every layer
    logits_bytes: int  # max_batch_rows float32 logits, and their masked copy under a constraint
    activation_bytes: int  # one layer's activations for batch_tokens prefill tokens
    unpack_bytes: int  # one expert being unpacked: int32 codes and values
    expert_cache_bytes: int
    runtime_bytes: int = RUNTIME_GROWTH_BYTES
    # Scoring labels as rows finish: their contexts copied out of the KV cache (at most half of it)
    # and one scoring pass's logits with their log-softmax temporary.
    scoring_bytes: int = 0

    @property
    def reserve_bytes(self) -> int:
        return (self.kv_bytes + self.logits_bytes + self.activation_bytes + self.unpack_bytes + self.runtime_bytes
                + self.scoring_bytes)

    @property
    def shortfall_bytes(self) -> int:
        """How far the budget is below what the job needs without any expert cache (0: it fits)."""
        return max(self.in_use_bytes + self.reserve_bytes - self.budget_bytes, 0)


def plan_host_memory(config: ModelConfig, budget_bytes: int, in_use_bytes: int, batch_tokens: int, max_batch_rows: int,
                     dtype_bytes: int, expert_cache_cap: int, label_scoring: bool = False) -> HostBudget:
    kv_per_token = sum(kv_bytes_per_token(config, dtype_bytes))
    hidden, inter = config.hidden_size, config.intermediate_size
    activations = batch_tokens * activation_bytes_per_token(config) * max(dtype_bytes, BF16) // BF16
    unpack = 2 * inter * hidden * 2 + 3 * inter * hidden * dtype_bytes  # w1's int32 codes; w1 and w2 values
    scoring = (label_scoring_copy_bytes(config, batch_tokens, max_batch_rows, dtype_bytes) + label_scoring_logits_bytes(config)
               if label_scoring else 0)
    partial = HostBudget(budget_bytes, in_use_bytes, batch_tokens * kv_per_token, 2 * max_batch_rows * config.vocab_size * 4,
                         activations, unpack, 0, scoring_bytes=scoring)
    room = budget_bytes - in_use_bytes - partial.reserve_bytes
    return HostBudget(**{**partial.__dict__, "expert_cache_bytes": max(min(room, expert_cache_cap), 0)})


def format_host_budget(plan: HostBudget) -> str:
    rows = [("memory budget (anonymous)", plan.budget_bytes), ("  in use with the model loaded", plan.in_use_bytes),
            ("  KV cache, a full batch", plan.kv_bytes), ("  logits buffers", plan.logits_bytes),
            ("  prefill activations", plan.activation_bytes), ("  unpacking one expert", plan.unpack_bytes),
            ("  runtime growth (oneDNN, heap)", plan.runtime_bytes)]
    if plan.scoring_bytes:
        rows.append(("  label scoring", plan.scoring_bytes))
    rows.append(("  expert cache", plan.expert_cache_bytes))
    text = "\n".join(f"{label:<32} {_size(size):>12}" for label, size in rows)
    if plan.shortfall_bytes:
        text += f"\nthe budget is {_size(plan.shortfall_bytes)} short of what the batch needs: lower --batch-tokens or --max-batch-rows"
    return text
