"""How float32 matrix multiplications run on the CPU.

oneDNN has a "bf16" fpmath mode for float32 matmuls. On CPUs with AVX512-BF16 it keeps float32-level
error (measured here: ~1e-6 relative against float64, IEEE float32 ~4e-7) at 2.2-2.7x the speed,
because it splits float32 operands into bfloat16 parts instead of rounding them. Nothing promises
that on every CPU or oneDNN build, so "auto" turns it on only after a probe at start-up shows the
error stays at float32 level; otherwise matmuls stay IEEE.
"""

import contextlib
import functools

import torch

FP32_MATMUL_MODES = ("auto", "ieee", "bf16")

# Float32 matmuls at these shapes land ~3e-7..1e-6 from float64; a bf16-rounding mode lands ~4e-3.
PROBE_TOLERANCE = 1e-5
_PROBE_SHAPES = ((1, 512, 256), (37, 640, 384), (256, 2880, 128))


def relative_error(matmul, shapes=_PROBE_SHAPES, seed: int = 0) -> float:
    """Worst max-abs error of `matmul(a, b)` against float64, relative to the result's scale."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g) * 0.02
        exact = a.double() @ b.double()
        worst = max(worst, ((matmul(a, b).double() - exact).abs().max() / exact.abs().max()).item())
    return worst


@contextlib.contextmanager
def onednn_fp32_precision(mode: str):
    """Sets oneDNN's internal precision for float32 matmuls inside the block (a process-wide flag)."""
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    backend.fp32_precision = mode
    try:
        yield
    finally:
        backend.fp32_precision = before


@functools.cache
def bf16_mode_keeps_fp32_accuracy() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    with onednn_fp32_precision("bf16"):
        return relative_error(torch.mm) < PROBE_TOLERANCE


def resolve_fp32_matmul(mode: str, device: torch.device) -> str:
    """The oneDNN precision a CPU float32 model runs its matmuls at: "bf16" or "ieee"."""
    if mode not in FP32_MATMUL_MODES:
        raise ValueError(f"--fp32-matmul must be one of {', '.join(FP32_MATMUL_MODES)}, got {mode!r}")
    if device.type != "cpu" or mode == "ieee":
        return "ieee"
    if mode == "bf16":
        return "bf16"
    return "bf16" if bf16_mode_keeps_fp32_accuracy() else "ieee"
