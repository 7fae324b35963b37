"""Random gpt-oss checkpoints in the exact released layout.

The numbers are random; the files, names, dtypes and MXFP4 packing are the
real ones, so loaders, pipelines and tests run without 60 GB of weights.
"""

from dataclasses import replace
from pathlib import Path

import torch

from ossbatch.engine.config import PRESETS, ModelConfig
from ossbatch.engine.weights import U8, hf_tensor_specs, save_hf_checkpoint, save_original_checkpoint

TINY = ModelConfig(
    num_hidden_layers=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
)

# e2m1 codes have an RMS of about 2.9; a scale of 2**-7 gives weights of RMS ~0.023.
_EXPERT_SCALE_EXPONENT = -7


def _random_tensor(name: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == U8:
        if name.endswith("_scales"):
            exponent = torch.randint(-1, 2, shape, generator=gen) + 127 + _EXPERT_SCALE_EXPONENT
            return exponent.to(U8)
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(U8)
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if name.endswith("sinks"):
        return torch.randn(shape, generator=gen).to(dtype)
    return (0.02 * torch.randn(shape, generator=gen)).to(dtype)


def random_tensors(config: ModelConfig, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    specs = hf_tensor_specs(config)
    out = {}
    for name in names:
        # A generator per tensor, seeded by its name, so shards and layouts hold the same numbers.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        shape, dtype = specs[name]
        out[name] = _random_tensor(name, shape, dtype, gen)
    return out


def write_random_checkpoint(
    directory,
    config: ModelConfig = TINY,
    seed: int = 0,
    layout: str = "hf",
    layers_per_shard: int = 0,
) -> Path:
    """Write a random checkpoint; `layout` is "hf", "original" or "both";
    `layers_per_shard` > 0 splits the HF layout into indexed shards."""
    directory = Path(directory)
    names = list(hf_tensor_specs(config))
    if layout in ("hf", "both"):
        groups = [[n for n in names if not n.startswith("model.layers.")]]
        if layers_per_shard:
            for first in range(0, config.num_hidden_layers, layers_per_shard):
                layer_ids = range(first, min(first + layers_per_shard, config.num_hidden_layers))
                prefixes = tuple(f"model.layers.{i}." for i in layer_ids)
                groups.append([n for n in names if n.startswith(prefixes)])
        else:
            groups[0] = names
        shards = [lambda g=g: random_tensors(config, g, seed) for g in groups]
        save_hf_checkpoint(directory, config, shards)
    if layout in ("original", "both"):
        save_original_checkpoint(directory, config, random_tensors(config, names, seed))
    if layout not in ("hf", "original", "both"):
        raise ValueError(f"layout must be hf, original or both, got {layout!r}")
    return directory


def preset_config(preset: str | None, **overrides) -> ModelConfig:
    base = TINY if preset in (None, "tiny") else PRESETS.get(preset)
    if base is None:
        raise ValueError(f"--preset must be one of tiny, {', '.join(PRESETS)}; got {preset!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.setdefault("layer_types", ())  # regenerated for the (possibly new) layer count
    return replace(base, **overrides)
