"""The gpt-oss checkpoint format, and only this module knows it.

Two layouts are read:
- Hugging Face (`config.json`, `model.safetensors` or sharded
  `model-0000k-of-0000N.safetensors` with `model.safetensors.index.json`),
- the release's `original/` folder (OpenAI's reference names).

Expert weights stay packed in MXFP4 (`*_blocks` uint8 ``[E, rows, K/32, 16]``
and `*_scales` uint8 ``[E, rows, K/32]``) and memory-mapped; everything else is
converted to the compute dtype, and used in place from the mapping where it is
already in it (`ModelWeights.host_bytes()` counts what was copied).  Every tensor's shape is checked, and a bad
one is reported with its file and name.
"""

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ossbatch.engine.config import CheckpointError, ModelConfig, checkpoint_layout, read_config

BF16 = torch.bfloat16
U8 = torch.uint8


class RowBlocks:
    """A weight matrix kept as the blocks of rows the checkpoint stores apart (the Hugging Face
    layout's q, k and v projections), so that it is used in place from the mapping rather than
    fused into a copy (0.7 GiB at gpt-oss-20b). Moved to another device, it is fused there."""

    def __init__(self, *parts: torch.Tensor):
        self.parts = parts

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def shape(self) -> tuple:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    def to(self, device) -> "RowBlocks | torch.Tensor":
        return self if torch.device(device) == self.device else torch.cat([p.to(device) for p in self.parts])


def linear(x: torch.Tensor, weight: "torch.Tensor | RowBlocks", bias: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias, for a weight held whole or as `RowBlocks`."""
    if isinstance(weight, RowBlocks):
        biases = bias.split([p.shape[0] for p in weight.parts])
        return torch.cat([torch.addmm(b, x, w.t()) for w, b in zip(weight.parts, biases)], dim=-1)
    return torch.addmm(bias, x, weight.t())


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv_weight: "torch.Tensor | RowBlocks"  # [(Hq + 2 Hkv) D, H]; RowBlocks where q, k, v lie apart on disk
    qkv_bias: torch.Tensor
    sinks: torch.Tensor  # [Hq] float32
    out_weight: torch.Tensor  # [H, Hq D]
    out_bias: torch.Tensor
    mlp_norm: torch.Tensor
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor
    w1_blocks: torch.Tensor  # [E, 2I, H/32, 16] uint8, gate/linear columns interleaved
    w1_scales: torch.Tensor
    w1_bias: torch.Tensor  # [E, 2I]
    w2_blocks: torch.Tensor  # [E, H, I/32, 16]
    w2_scales: torch.Tensor
    w2_bias: torch.Tensor  # [E, H]


@dataclass
class ModelWeights:
    config: ModelConfig
    embedding: torch.Tensor  # [V, H], kept in the checkpoint dtype: only looked-up rows are converted
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    unembedding: torch.Tensor  # [V, H]
    # Storages that are the checkpoint's own memory mapping (file-backed pages), not copies.
    mapped_storages: frozenset = field(default=frozenset(), repr=False)

    def tensors(self) -> list[torch.Tensor]:
        layer_tensors = [getattr(layer, f.name) for layer in self.layers for f in fields(layer)]
        return [self.embedding, self.final_norm, self.unembedding, *layer_tensors]

    def host_bytes(self) -> dict[str, int]:
        """Bytes of the weights used in place from the checkpoint's mapping ("mapped": file-backed,
        the kernel may drop and re-read them) and copied out of it ("copied": anonymous memory,
        converted to the compute dtype or fused)."""
        out = {"mapped": 0, "copied": 0}
        seen = set()
        for t in [p for t in self.tensors() for p in (t.parts if isinstance(t, RowBlocks) else (t,))]:
            if t.device.type != "cpu" or (t.data_ptr(), t.numel()) in seen:
                continue
            seen.add((t.data_ptr(), t.numel()))
            out["mapped" if t.untyped_storage().data_ptr() in self.mapped_storages else "copied"] += t.numel() * t.element_size()
        return out

    def to(self, device) -> "ModelWeights":
        """The same weights on `device` (a no-op on the CPU, where they stay memory-mapped)."""
        if torch.device(device) == self.final_norm.device:
            return self
        move = lambda obj: type(obj)(**{f: getattr(obj, f).to(device) for f in obj.__dataclass_fields__})  # noqa: E731
        return ModelWeights(self.config, self.embedding.to(device), [move(layer) for layer in self.layers],
                            self.final_norm.to(device), self.unembedding.to(device))


def _blocks_shape(config: ModelConfig, rows: int, k: int) -> tuple[tuple, tuple]:
    groups = (k + 31) // 32
    e = config.num_local_experts
    return (e, rows, groups, 16), (e, rows, groups)


def hf_tensor_specs(config: ModelConfig) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every tensor of the Hugging Face layout: name -> (shape, dtype)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    specs = {
        "model.embed_tokens.weight": ((c.vocab_size, c.hidden_size), BF16),
        "model.norm.weight": ((c.hidden_size,), BF16),
        "lm_head.weight": ((c.vocab_size, c.hidden_size), BF16),
    }
    w1_blocks, w1_scales = _blocks_shape(c, 2 * c.intermediate_size, c.hidden_size)
    w2_blocks, w2_scales = _blocks_shape(c, c.hidden_size, c.intermediate_size)
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        specs |= {
            p + "input_layernorm.weight": ((c.hidden_size,), BF16),
            p + "post_attention_layernorm.weight": ((c.hidden_size,), BF16),
            p + "self_attn.q_proj.weight": ((q, c.hidden_size), BF16),
            p + "self_attn.q_proj.bias": ((q,), BF16),
            p + "self_attn.k_proj.weight": ((kv, c.hidden_size), BF16),
            p + "self_attn.k_proj.bias": ((kv,), BF16),
            p + "self_attn.v_proj.weight": ((kv, c.hidden_size), BF16),
            p + "self_attn.v_proj.bias": ((kv,), BF16),
            p + "self_attn.o_proj.weight": ((c.hidden_size, q), BF16),
            p + "self_attn.o_proj.bias": ((c.hidden_size,), BF16),
            p + "self_attn.sinks": ((c.num_attention_heads,), BF16),
            p + "mlp.router.weight": ((c.num_local_experts, c.hidden_size), BF16),
            p + "mlp.router.bias": ((c.num_local_experts,), BF16),
            p + "mlp.experts.gate_up_proj_blocks": (w1_blocks, U8),
            p + "mlp.experts.gate_up_proj_scales": (w1_scales, U8),
            p + "mlp.experts.gate_up_proj_bias": ((c.num_local_experts, 2 * c.intermediate_size), BF16),
            p + "mlp.experts.down_proj_blocks": (w2_blocks, U8),
            p + "mlp.experts.down_proj_scales": (w2_scales, U8),
            p + "mlp.experts.down_proj_bias": ((c.num_local_experts, c.hidden_size), BF16),
        }
    return specs


def hf_to_original_names(config: ModelConfig) -> dict[str, str]:
    """HF name -> `original/` name, for tensors that map one to one (q/k/v fuse into qkv)."""
    names = {
        "model.embed_tokens.weight": "embedding.weight",
        "model.norm.weight": "norm.scale",
        "lm_head.weight": "unembedding.weight",
    }
    for n in range(config.num_hidden_layers):
        hf, og = f"model.layers.{n}.", f"block.{n}."
        names |= {
            hf + "input_layernorm.weight": og + "attn.norm.scale",
            hf + "post_attention_layernorm.weight": og + "mlp.norm.scale",
            hf + "self_attn.o_proj.weight": og + "attn.out.weight",
            hf + "self_attn.o_proj.bias": og + "attn.out.bias",
            hf + "self_attn.sinks": og + "attn.sinks",
            hf + "mlp.router.weight": og + "mlp.gate.weight",
            hf + "mlp.router.bias": og + "mlp.gate.bias",
            hf + "mlp.experts.gate_up_proj_blocks": og + "mlp.mlp1_weight.blocks",
            hf + "mlp.experts.gate_up_proj_scales": og + "mlp.mlp1_weight.scales",
            hf + "mlp.experts.gate_up_proj_bias": og + "mlp.mlp1_bias",
            hf + "mlp.experts.down_proj_blocks": og + "mlp.mlp2_weight.blocks",
            hf + "mlp.experts.down_proj_scales": og + "mlp.mlp2_weight.scales",
            hf + "mlp.experts.down_proj_bias": og + "mlp.mlp2_bias",
        }
    return names


class _TensorFiles:
    """Name -> tensor over one or many safetensors files, memory-mapped."""

    def __init__(self, files: dict[str, Path]):
        self._file_of = files
        self._handles = {}

    @classmethod
    def open_dir(cls, directory: Path) -> "_TensorFiles":
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
            files = {name: directory / fname for name, fname in weight_map.items()}
            for path in set(files.values()):
                if not path.exists():
                    raise CheckpointError(f"{index} names {path.name}, which does not exist")
            return cls(files)
        single = directory / "model.safetensors"
        if single.exists():
            paths = [single]
        else:
            paths = sorted(directory.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        files = {}
        for path in paths:
            with safe_open(path, framework="pt") as f:
                files |= {name: path for name in f.keys()}
        return cls(files)

    def get(self, name: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            where = sorted({p.name for p in self._file_of.values()})
            raise CheckpointError(f"tensor {name} is missing from the checkpoint ({', '.join(where)})")
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        tensor = self._handles[path].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        if dtype is not None and tensor.dtype != dtype:
            if dtype == U8 or tensor.dtype == U8:
                raise CheckpointError(f"{path.name}: tensor {name} is {tensor.dtype}, expected {dtype}")
        return tensor


def load_weights(model_dir, dtype: torch.dtype = torch.float32) -> ModelWeights:
    """Read a checkpoint (either layout); expert blocks stay packed and memory-mapped."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    specs = hf_tensor_specs(config)
    layout, folder = checkpoint_layout(model_dir)  # the root, or its original/ folder given directly
    if layout == "hf":
        files, name_of = _TensorFiles.open_dir(folder), None
    else:
        files, name_of = _TensorFiles.open_dir(folder), hf_to_original_names(config)

    mapped = set()

    def in_place(t: torch.Tensor) -> torch.Tensor:
        mapped.add(t.untyped_storage().data_ptr())
        return t

    def tensor(hf_name: str, convert: bool = True) -> torch.Tensor:
        shape, kind = specs[hf_name]
        t = in_place(files.get(name_of.get(hf_name, hf_name) if name_of else hf_name, shape, kind))
        return t.to(dtype) if convert and kind != U8 else t  # no copy when the dtype is already `dtype`

    def qkv(n: int, part: str) -> torch.Tensor:
        if name_of is None:
            p = f"model.layers.{n}.self_attn."
            parts = [tensor(p + f"{x}_proj.{part}") for x in "qkv"]
            untouched = part == "weight" and all(t.untyped_storage().data_ptr() in mapped for t in parts)
            return RowBlocks(*parts) if untouched else torch.cat(parts)  # a converted copy fuses for free
        rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        shape = (rows, config.hidden_size) if part == "weight" else (rows,)
        return in_place(files.get(f"block.{n}.attn.qkv.{part}", shape)).to(dtype)

    layers = []
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        layers.append(
            LayerWeights(
                attn_norm=tensor(p + "input_layernorm.weight"),
                qkv_weight=qkv(n, "weight"),
                qkv_bias=qkv(n, "bias"),
                sinks=tensor(p + "self_attn.sinks", convert=False).float(),
                out_weight=tensor(p + "self_attn.o_proj.weight"),
                out_bias=tensor(p + "self_attn.o_proj.bias"),
                mlp_norm=tensor(p + "post_attention_layernorm.weight"),
                router_weight=tensor(p + "mlp.router.weight"),
                router_bias=tensor(p + "mlp.router.bias"),
                w1_blocks=tensor(p + "mlp.experts.gate_up_proj_blocks"),
                w1_scales=tensor(p + "mlp.experts.gate_up_proj_scales"),
                w1_bias=tensor(p + "mlp.experts.gate_up_proj_bias"),
                w2_blocks=tensor(p + "mlp.experts.down_proj_blocks"),
                w2_scales=tensor(p + "mlp.experts.down_proj_scales"),
                w2_bias=tensor(p + "mlp.experts.down_proj_bias"),
            )
        )
    return ModelWeights(
        config=config,
        embedding=tensor("model.embed_tokens.weight", convert=False),
        layers=layers,
        final_norm=tensor("model.norm.weight"),
        unembedding=tensor("lm_head.weight"),
        mapped_storages=frozenset(mapped),
    )


def save_hf_checkpoint(directory, config: ModelConfig, shards: list):
    """Write the released layout from `shards`: dicts of HF-named tensors, or
    callables returning them (so a large checkpoint is made one file at a time)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2) + "\n")
    if len(shards) == 1:
        save_file(_materialize(shards[0]), directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = _materialize(shard)
        save_file(tensors, directory / fname, metadata={"format": "pt"})
        weight_map |= {name: fname for name in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _materialize(shard) -> dict[str, torch.Tensor]:
    tensors = shard() if callable(shard) else shard
    return {name: t.contiguous() for name, t in tensors.items()}


def save_original_checkpoint(directory, config: ModelConfig, tensors: dict[str, torch.Tensor]):
    """Write `tensors` (HF names) in the release's `original/` layout."""
    target = Path(directory) / "original"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config.to_original_json(), indent=2) + "\n")
    names = hf_to_original_names(config)
    out = {names[k]: v.contiguous() for k, v in tensors.items() if k in names}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}.self_attn."
        for part in ("weight", "bias"):
            out[f"block.{n}.attn.qkv.{part}"] = torch.cat([tensors[p + f"{x}_proj.{part}"] for x in "qkv"]).contiguous()
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})


def checkpoint_fingerprint(model_dir, cache_file: Path | None = None) -> dict:
    """The model's identity for a job's manifest: path and a SHA-256 over its
    config and weight files (so a changed checkpoint under the same path shows).

    Hashing 60 GB of weights takes minutes, so each file's digest is cached by
    (path, size, mtime) in `cache_file` (default: ~/.cache/ossbatch/file-digests.json):
    a nightly job re-hashes only files that changed.
    """
    import hashlib

    model_dir = Path(model_dir).resolve()
    if cache_file is None:
        cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ossbatch" / "file-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and (p.suffix in (".json", ".safetensors")))
    changed = False
    for path in files:
        stat = path.stat()
        key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            file_digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    file_digest.update(chunk)
            cache[key], changed = file_digest.hexdigest(), True
        digest.update(f"{path.relative_to(model_dir)}:{cache[key]}\n".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(cache))
            os.replace(temporary, cache_file)
        except OSError:
            pass  # a read-only home only costs the re-hash next time
    return {"path": str(model_dir), "content_hash": "sha256:" + digest.hexdigest(), "files": len(files)}
