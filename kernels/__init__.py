"""One op per module, each with its torch reference beside the Triton kernel.

`ops(backend)` returns the set the engine calls: "torch" (the references, and
the CPU path; attention through torch's fused SDPA) or "triton" (GPU, or the CPU under TRITON_INTERPRET=1).
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Ops:
    rmsnorm: Callable
    route: Callable
    plan_routing: Callable
    moe: Callable
    attention: Callable
    attention_lse: Callable  # attention that also returns its log-sum-exp (cascade attention's parts)
    merge_attention: Callable  # two attention states merged by their log-sum-exp


def ops(backend: str) -> Ops:
    if backend == "torch":
        from ossbatch.kernels.attention import attention_sdpa, attention_torch
        from ossbatch.kernels.cascade import merge_attention_torch
        from ossbatch.kernels.moe import moe_torch
        from ossbatch.kernels.rmsnorm import rmsnorm_torch
        from ossbatch.kernels.routing import plan_routing_torch, route_torch

        return Ops(rmsnorm_torch, route_torch, plan_routing_torch, moe_torch, attention_sdpa,
                   partial(attention_torch, return_lse=True), merge_attention_torch)
    if backend == "triton":
        from ossbatch.kernels.attention import attention_triton
        from ossbatch.kernels.cascade import merge_attention_triton
        from ossbatch.kernels.moe import moe_triton
        from ossbatch.kernels.rmsnorm import rmsnorm_triton
        from ossbatch.kernels.routing import plan_routing_torch, route_triton

        return Ops(rmsnorm_triton, route_triton, plan_routing_torch, moe_triton, attention_triton,
                   partial(attention_triton, return_lse=True), merge_attention_triton)
    raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
