import pytest
import torch

from ossbatch.kernels.rmsnorm import rmsnorm_torch, rmsnorm_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 3, 100), (4, 2880)])  # 100 and 2880: not powers of two
def test_rmsnorm_matches_reference(shape, dtype, device, assert_matches):
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 3 + 0.5).to(dtype)
    weight = torch.randn(shape[-1], device=device).to(dtype)
    out = rmsnorm_triton(x, weight, 1e-5)
    assert_matches(out, rmsnorm_torch(x, weight, 1e-5))


def test_rmsnorm_eps_and_strided_rows(device, assert_matches):
    torch.manual_seed(1)
    x = torch.randn(6, 96, device=device)[::2] * 1e-3  # non-contiguous rows; tiny values make eps matter
    weight = torch.randn(96, device=device)
    assert_matches(rmsnorm_triton(x, weight, 1e-2), rmsnorm_torch(x, weight, 1e-2))
    assert not torch.allclose(rmsnorm_triton(x, weight, 1e-2), rmsnorm_triton(x, weight, 1e-6))
