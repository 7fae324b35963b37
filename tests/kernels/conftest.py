"""Kernel tests run the Triton kernels under the interpreter unless told otherwise.

TRITON_INTERPRET must be set before any `@triton.jit` in kernels/ is decorated
(the decorator picks interpreter or compiler), so it is set here, at import
time, before the test modules import kernels.  `TRITON_INTERPRET=0 pytest
tests/kernels` runs the same tests compiled on a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETING = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes")

# Test modules collected earlier (tests/engine imports kernels.moe) may already
# have imported kernels/ with the compiler chosen; re-import those modules, in
# dependency order, so their kernels are decorated for the interpreter.
_KERNEL_MODULES = ("ossbatch.kernels.triton_compat", "ossbatch.kernels.rmsnorm", "ossbatch.kernels.routing", "ossbatch.kernels.moe", "ossbatch.kernels.attention")
if INTERPRETING and "ossbatch.kernels.triton_compat" in sys.modules and not sys.modules["ossbatch.kernels.triton_compat"].INTERPRETING:
    for _name in _KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


@pytest.fixture
def device() -> str:
    if not INTERPRETING:
        if not torch.cuda.is_available():
            pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
        return "cuda"
    return "cpu"


def tolerance(reference: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute error allowed, relative to the reference's magnitude.

    float32: 1e-4 of the largest value (the kernels accumulate in float32, in
    another order).  bfloat16: the reference rounds its intermediates to bf16
    (the MoE's hidden activations, the attention scores) where the kernels keep
    float32, so single values may differ by a few bf16 ulps (2e-2 of the largest
    value is ~5 ulps) while the mean error must stay within 2e-3 of it.
    """
    scale = max(reference.float().abs().max().item(), 1.0) if reference.numel() else 1.0
    if reference.dtype == torch.float32:
        return 1e-4 * scale, 1e-4 * scale
    return 2e-2 * scale, 5e-3 * scale


def _assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.dtype == reference.dtype, f"dtype {out.dtype} != reference {reference.dtype}"
    assert out.shape == reference.shape, f"shape {tuple(out.shape)} != reference {tuple(reference.shape)}"
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    if not out.numel():
        return
    max_tol, mean_tol = tolerance(reference)
    err = (out.float() - reference.float()).abs()
    assert err.max().item() <= max_tol, f"max |kernel - reference| = {err.max().item():.3g} > {max_tol:.3g}"
    assert err.mean().item() <= mean_tol, f"mean |kernel - reference| = {err.mean().item():.3g} > {mean_tol:.3g}"


@pytest.fixture
def assert_matches():
    """`assert_matches(out, reference)`: same dtype and shape, finite, within `tolerance`."""
    return _assert_matches


@pytest.fixture
def assert_as_accurate():
    """`assert_as_accurate(out, reference, exact)`: measured against `exact` (the
    reference evaluated in float32 on the same inputs), the kernel's max and mean
    errors are no worse than the bf16 reference's own, give or take 1e-3 of the scale."""

    def check(out: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor) -> None:
        slack = 1e-3 * max(exact.abs().max().item(), 1.0)
        out_err, ref_err = (out.float() - exact).abs(), (reference.float() - exact).abs()
        for stat in (torch.amax, torch.mean):
            assert stat(out_err).item() <= stat(ref_err).item() + slack, (
                f"{stat.__name__} error vs float32: kernel {stat(out_err).item():.3g}, reference {stat(ref_err).item():.3g}"
            )

    return check
