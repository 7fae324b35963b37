"""The checkpoint loader: both released layouts, shards, and clear refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossbatch.engine.config import CheckpointError
from ossbatch.engine.generate import SamplingParams, generate
from ossbatch.engine.model import Transformer
from ossbatch.engine.tiny_model import TINY, write_random_checkpoint
from ossbatch.engine.weights import load_weights


def _greedy(path) -> list[list[int]]:
    model = Transformer.from_checkpoint(path)
    completions, _ = generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42]], [SamplingParams(max_tokens=6)] * 2, [200002], logprobs=True)
    return [(c.token_ids, c.logprobs) for c in completions]


def test_sharded_and_original_layouts_load_the_same_model(tmp_path):
    single = write_random_checkpoint(tmp_path / "single", TINY, seed=3)
    sharded = write_random_checkpoint(tmp_path / "sharded", TINY, seed=3, layers_per_shard=1)
    original = write_random_checkpoint(tmp_path / "original", TINY, seed=3, layout="original")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + TINY.num_hidden_layers
    assert not (original / "config.json").exists() and (original / "original" / "model.safetensors").exists()
    expected = _greedy(single)
    assert _greedy(sharded) == expected
    assert _greedy(original) == expected


def test_released_layout_names_and_dtypes(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["vocab_size"] == 201088
    tensors = load_file(tiny_model_dir / "model.safetensors")
    blocks = tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks.dtype == torch.uint8 and blocks.shape == (8, 128, 2, 16)
    assert tensors["model.layers.0.mlp.experts.down_proj_scales"].shape == (8, 64, 2)
    assert tensors["model.layers.1.self_attn.sinks"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].shape == (201088, 64)


def test_experts_stay_packed(tiny_model_dir):
    weights = load_weights(tiny_model_dir, torch.float32)
    layer = weights.layers[0]
    assert layer.w1_blocks.dtype == torch.uint8 and layer.w2_scales.dtype == torch.uint8
    assert layer.qkv_weight.dtype == torch.float32


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nowhere")


def test_config_that_is_not_gpt_oss_is_refused(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", TINY)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama'"):
        load_weights(path)


def test_tensor_with_wrong_shape_names_file_and_tensor(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", TINY)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} has shape \(31, 64\), expected \(32, 64\)"):
        load_weights(path)


def test_missing_tensor_is_named(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", TINY)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.router.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.router\.bias is missing"):
        load_weights(path)


def test_fingerprint_changes_with_the_weights_and_reuses_cached_digests(tmp_path):
    from ossbatch.engine.weights import checkpoint_fingerprint

    path = write_random_checkpoint(tmp_path / "m", TINY, seed=1)
    cache = tmp_path / "digests.json"
    first = checkpoint_fingerprint(path, cache)
    assert json.loads(cache.read_text()), "per-file digests are cached"
    assert checkpoint_fingerprint(path, cache) == first
    # A changed weight file under the same path changes the identity (new mtime and bytes).
    write_random_checkpoint(path, TINY, seed=2)
    assert checkpoint_fingerprint(path, cache)["content_hash"] != first["content_hash"]
    # Without the cache the digest is the same as with it.
    assert checkpoint_fingerprint(path, tmp_path / "fresh.json") == checkpoint_fingerprint(path, cache)
