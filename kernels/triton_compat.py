"""Two helpers that keep the kernels' arithmetic the same compiled on a GPU and
under the Triton interpreter (TRITON_INTERPRET=1, how the tests run on a CPU).

The interpreter keeps bfloat16 as raw uint16 bits: `tl.dot` on bf16 multiplies
the bit patterns (triton-lang/triton#11584: "we just don't support it yet")
and a float32 -> bf16 cast truncates where the GPU rounds to nearest even.
"""

import torch
import triton
import triton.language as tl

# Read when kernels/ is imported, the moment @triton.jit chooses interpreter or compiler.
INTERPRETING = tl.constexpr(bool(triton.knobs.runtime.interpret))


def dot_operand_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype a kernel hands tl.dot for `dtype` tensors.

    Under the interpreter bf16 operands are widened to float32: products of
    bf16 values are exact in float32 and the MMA accumulates in float32, so
    the result is the one the GPU computes, up to summation order.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the Triton kernels take float32 or bfloat16 tensors, got {dtype}")
    if dtype == torch.bfloat16 and not triton.knobs.runtime.interpret:
        return tl.bfloat16
    return tl.float32


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """float32 `x` to `dtype`, rounding to nearest even as the GPU's cast does."""
    if INTERPRETING:  # compiled, this whole branch is dropped at compile time
        if dtype == tl.bfloat16:
            # Round in float32 bits, so the interpreter's truncating cast is then exact.
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# Launch capture: `benchmarks/gpu_compile.py` runs the real launchers on meta tensors with
# this set, so it compiles the very arguments, constexprs, warps and stages they would launch.
_captured_launches: list | None = None


def launch(kernel, grid, *args, options_by_arch: dict | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded as (kernel, grid, args, kwargs) while capturing.

    `options_by_arch` maps a compute capability major (9: Hopper) to extra compile options
    for that generation only; while capturing it is kept under the "options_by_arch" key.
    """
    if _captured_launches is not None:
        _captured_launches.append((kernel, grid, args, dict(kwargs, options_by_arch=options_by_arch or {})))
        return
    if options_by_arch and not triton.knobs.runtime.interpret:
        major = torch.cuda.get_device_capability(args[0].device)[0]
        kwargs.update(options_by_arch.get(major, {}))
    kernel[grid](*args, **kwargs)


class capture_launches:
    """``with capture_launches() as launches: moe_triton(...)``: record the launches instead of running them."""

    def __enter__(self) -> list:
        global _captured_launches
        self._saved, _captured_launches = _captured_launches, []
        return _captured_launches

    def __exit__(self, *exc) -> None:
        global _captured_launches
        _captured_launches = self._saved
