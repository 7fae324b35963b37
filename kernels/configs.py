"""Launch configurations: one table, read by the kernels at launch and by
`benchmarks/gpu_compile.py`, so what is compiled and measured is what would run.

Shapes fall into buckets by tokens per step: decode at batch 1, 8, 64 and 256
(a step of up to that many tokens) and prefill (more).  Each kernel has a
configuration per bucket, chosen from the compiled cubins' resources
(`benchmarks/gpu_compile.py`: registers, spills, shared memory, occupancy and
the MMA instructions in the SASS, for sm_90 and sm_100).
"""

from dataclasses import dataclass, replace

DECODE_BATCHES = (1, 8, 64, 256)
PREFILL_TOKENS = 8192  # the prefill bucket's reference shape


def bucket(tokens: int) -> str:
    """The shape bucket of a step of `tokens` tokens: "decode1" .. "decode256", else "prefill"."""
    for batch in DECODE_BATCHES:
        if tokens <= batch:
            return f"decode{batch}"
    return "prefill"


@dataclass(frozen=True)
class MoeConfig:
    """The grouped MXFP4 matmul (both launches of `moe_triton`).

    ``block_m`` rows of one expert per tile (the routing plan's block), ``block_n``
    weight columns, ``block_k`` along the reduction.  ``swap_ab``: the tile is
    computed transposed, W-tile x X-tile^T, so the weight columns fill the MMA's
    M side (64 rows for a Hopper wgmma) and the few token rows of a decode step
    sit on its N side (which can be as small as 8 or 16): as `matmul_ogs` does
    for small batches.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False
    weight_prefetch: int = 1  # weight tiles in flight ahead of the one computed (the kernel prefetches by hand)
    # ptxas's register cap per thread (Triton's maxnreg) by GPU generation (compute capability
    # major): fits one more CTA per SM where the compiled cubin still does not spill at the cap.
    max_registers: tuple = ()  # ((major, registers), ...)

    @property
    def name(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}" + ("swap" if self.swap_ab else "")
                + (f"p{self.weight_prefetch}" if self.weight_prefetch != 1 else "")
                + "".join(f"r{registers}sm{major}x" for major, registers in self.max_registers))

    def launch_options(self) -> dict:
        """Keyword arguments for `triton_compat.launch`."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers:
            options["options_by_arch"] = {major: {"maxnreg": registers} for major, registers in self.max_registers}
        return options


@dataclass(frozen=True)
class AttentionConfig:
    """The flash-attention kernel: ``block_m`` (query token, head) rows, ``block_n`` keys
    per step; ``num_splits`` > 1 splits the keys across programs (split-KV) when a decode
    step has too few (row, kv head) tiles to fill the GPU, merged by their log-sum-exps."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int = 1

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}" + (f"split{self.num_splits}" if self.num_splits > 1 else "")


@dataclass(frozen=True)
class RowConfig:
    """Row-wise kernels (RMSNorm, routing): ``block_rows`` rows per program."""

    block_rows: int
    num_warps: int
    num_stages: int = 1

    @property
    def name(self) -> str:
        return f"r{self.block_rows}w{self.num_warps}"


# MoE: keyed by rows per expert (tokens x top_k / experts, rounded up), which decides how
# full a tile's token side is; the first bucket whose bound holds is taken.  Up to 32 rows
# the tile is swapped (weights fill the wgmma's 64-row M, tokens its N of 16 or 32).  On
# Hopper the 16-row one is capped at 168 registers (no spill there at that cap; sm_100 would
# spill), so 3 CTAs fit an SM instead of 2.
MOE_BY_ROWS_PER_EXPERT = {
    "rows<=16": MoeConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3, swap_ab=True, weight_prefetch=2,
                          max_registers=((9, 128),)),
    "rows<=32": MoeConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3, swap_ab=True),
    "rows<=64": MoeConfig(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3),
    "rows>64": MoeConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3),
}

# Attention: keyed by the step's bucket (decode batch or prefill).
ATTENTION_BY_BUCKET = {
    "decode1": AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, num_splits=16),
    "decode8": AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, num_splits=4),
    "decode64": AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=3),
    "decode256": AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=3),
    # 64-row tiles at 4 warps (one warpgroup's wgmma M): 3 CTAs per SM, where 128 rows at 8 warps fit 1.
    "prefill": AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
}

RMSNORM = RowConfig(block_rows=1, num_warps=4)
ROUTE = RowConfig(block_rows=16, num_warps=4)


def moe_rows_bucket(tokens: int, top_k: int, num_experts: int) -> str:
    rows = -(-tokens * top_k // max(num_experts, 1))
    for name in MOE_BY_ROWS_PER_EXPERT:
        if name.startswith("rows<=") and rows <= int(name[len("rows<="):]):
            return name
    return "rows>64"


def moe_config(tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    return MOE_BY_ROWS_PER_EXPERT[moe_rows_bucket(tokens, top_k, num_experts)]


def moe_block_m(tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per routing-plan block for a step of `tokens` tokens (what `plan_routing_torch` cuts)."""
    return moe_config(tokens, top_k, num_experts).block_m


def attention_config(batch: int, q_len: int, group: int, kv_heads: int, span: int) -> AttentionConfig:
    """The table's configuration for a step: `span` bounds the keys one row can see
    (the cache length, or the window), so split-KV never gives a split less than a key block."""
    config = ATTENTION_BY_BUCKET[bucket(batch * q_len)]
    rows = q_len * group
    if rows > config.block_m and config.block_m < 64:  # a decode config met a multi-token step
        config = ATTENTION_BY_BUCKET["prefill"]
    key_blocks = max(1, -(-span // config.block_n))
    if config.num_splits > key_blocks:
        config = replace(config, num_splits=key_blocks)
    return config


def with_block_m(config: MoeConfig, block_m: int) -> MoeConfig:
    """`config` for a routing plan cut with another block_m (a caller's own plan)."""
    return config if config.block_m == block_m else replace(config, block_m=block_m)
