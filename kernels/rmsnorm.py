"""RMSNorm: ``x / sqrt(mean(x**2) + eps) * weight``, computed in float32."""

import torch
import triton
import triton.language as tl

from ossbatch.kernels.configs import RMSNORM
from ossbatch.kernels.triton_compat import cast_rtne, launch


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (t * weight.float()).to(x.dtype)


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    stride_x_row,
    stride_out_row,
    n_cols,
    eps,
    BLOCK_N: tl.constexpr,
):
    # One program per row: a gpt-oss row (2880 values) fits in registers, so
    # the row is read once and written once; the op is purely bandwidth-bound.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=in_row, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = x * inv_rms * weight
    tl.store(out_ptr + row * stride_out_row + cols, cast_rtne(y, out_ptr.dtype.element_ty), mask=in_row)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        launch(
            _rmsnorm_kernel, (rows.shape[0],),
            rows, weight.contiguous(), out, rows.stride(0), out.stride(0), hidden, eps,
            BLOCK_N=triton.next_power_of_2(hidden), num_warps=RMSNORM.num_warps,
        )
    return out.reshape(x.shape)
