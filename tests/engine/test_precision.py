"""The float32 matmul mode: the probe tells float32-level error from bf16 rounding, and the fast mode
changes no greedy token and moves logprobs by float32 rounding only."""

import pytest
import torch

from ossbatch.engine.generate import SamplingParams, generate
from ossbatch.engine.model import Transformer
from ossbatch.engine.precision import PROBE_TOLERANCE, bf16_mode_keeps_fp32_accuracy, relative_error, resolve_fp32_matmul


def test_probe_accepts_ieee_float32_and_rejects_bf16_rounding():
    assert relative_error(torch.mm) < PROBE_TOLERANCE / 10
    rounded = relative_error(lambda a, b: (a.bfloat16() @ b.bfloat16()).float())
    assert rounded > PROBE_TOLERANCE * 10


def test_resolve_names_the_flag_and_keeps_gpus_ieee():
    with pytest.raises(ValueError, match="--fp32-matmul"):
        resolve_fp32_matmul("fast", torch.device("cpu"))
    assert resolve_fp32_matmul("ieee", torch.device("cpu")) == "ieee"
    assert resolve_fp32_matmul("bf16", torch.device("cuda")) == "ieee"
    assert resolve_fp32_matmul("auto", torch.device("cpu")) == ("bf16" if bf16_mode_keeps_fp32_accuracy() else "ieee")


def test_bfloat16_models_ignore_the_mode(tiny_model_dir):
    assert Transformer.from_checkpoint(tiny_model_dir, torch.bfloat16, fp32_matmul="bf16").fp32_matmul == "ieee"


@pytest.mark.skipif(not bf16_mode_keeps_fp32_accuracy(), reason="oneDNN's bf16 mode rounds on this CPU; auto keeps IEEE")
def test_fast_mode_matches_ieee_and_leaves_the_global_flag_alone(tiny_model_dir):
    prompts = [[200006, 17, 42, 99, 1000 + i, 5] * (1 + i % 3) for i in range(6)]
    params = [SamplingParams(max_tokens=8, temperature=0.0)] * len(prompts)
    runs = {}
    before = torch.backends.mkldnn.matmul.fp32_precision
    for mode in ("ieee", "bf16"):
        model = Transformer.from_checkpoint(tiny_model_dir, torch.float32, fp32_matmul=mode)
        assert model.fp32_matmul == mode
        runs[mode], _ = generate(model, prompts, params, stop_token_ids=[], logprobs=True)
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    for ieee, fast in zip(runs["ieee"], runs["bf16"]):
        assert fast.token_ids == ieee.token_ids
        assert max(abs(a - b) for a, b in zip(fast.logprobs, ieee.logprobs)) < 1e-4
