"""The gpt-oss model configuration, read from a checkpoint's config.json."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 36
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5
    layer_types: tuple = field(default=())

    def __post_init__(self):
        if not self.layer_types:
            # gpt-oss alternates: even layers use the sliding window, odd layers attend to everything.
            types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)

    def window(self, layer: int) -> int:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def to_hf_json(self) -> dict:
        """config.json as the released Hugging Face checkpoints write it."""
        d = asdict(self)
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "hidden_act": "silu",
            "experts_per_token": d["num_experts_per_tok"],
            "num_experts_per_tok": d["num_experts_per_tok"],
            "num_local_experts": d["num_local_experts"],
            "num_hidden_layers": d["num_hidden_layers"],
            "vocab_size": d["vocab_size"],
            "hidden_size": d["hidden_size"],
            "intermediate_size": d["intermediate_size"],
            "swiglu_limit": d["swiglu_limit"],
            "head_dim": d["head_dim"],
            "num_attention_heads": d["num_attention_heads"],
            "num_key_value_heads": d["num_key_value_heads"],
            "sliding_window": d["sliding_window"],
            "initial_context_length": d["initial_context_length"],
            "max_position_embeddings": d["max_position_embeddings"],
            "rope_theta": d["rope_theta"],
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": d["rope_scaling_factor"],
                "beta_fast": d["rope_ntk_beta"],
                "beta_slow": d["rope_ntk_alpha"],
                "original_max_position_embeddings": d["initial_context_length"],
                "truncate": False,
            },
            "rms_norm_eps": d["rms_norm_eps"],
            "layer_types": list(self.layer_types),
            "initializer_range": 0.02,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "tie_word_embeddings": False,
            "use_cache": True,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
        }

    @classmethod
    def from_hf_json(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if raw.get("model_type") != "gpt_oss":
            raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, not 'gpt_oss'")
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        try:
            return cls(
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_local_experts=int(raw["num_local_experts"]),
                num_experts_per_tok=int(raw.get("num_experts_per_tok", raw.get("experts_per_token"))),
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
                head_dim=int(raw["head_dim"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                num_key_value_heads=int(raw["num_key_value_heads"]),
                sliding_window=int(raw["sliding_window"]),
                initial_context_length=int(rope.get("original_max_position_embeddings", raw.get("initial_context_length", 4096))),
                max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
                rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 150000.0))),
                rope_scaling_factor=float(rope.get("factor", 1.0)),
                rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
                rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                layer_types=tuple(raw.get("layer_types") or ()),
            )
        except KeyError as missing:
            raise CheckpointError(f"{source}: missing key {missing}") from None

    @classmethod
    def from_original_json(cls, raw: dict, source: str = "original/config.json") -> "ModelConfig":
        """The `original/` layout of the release (OpenAI's reference implementation)."""
        try:
            return cls(
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_local_experts=int(raw["num_experts"]),
                num_experts_per_tok=int(raw["experts_per_token"]),
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
                head_dim=int(raw["head_dim"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                num_key_value_heads=int(raw["num_key_value_heads"]),
                sliding_window=int(raw["sliding_window"]),
                initial_context_length=int(raw.get("initial_context_length", 4096)),
                rope_theta=float(raw.get("rope_theta", 150000.0)),
                rope_scaling_factor=float(raw.get("rope_scaling_factor", 32.0)),
                rope_ntk_alpha=float(raw.get("rope_ntk_alpha", 1.0)),
                rope_ntk_beta=float(raw.get("rope_ntk_beta", 32.0)),
            )
        except KeyError as missing:
            raise CheckpointError(f"{source}: missing key {missing}") from None

    def to_original_json(self) -> dict:
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
        }


GPT_OSS_120B = ModelConfig()
GPT_OSS_20B = ModelConfig(num_hidden_layers=24, num_local_experts=32)
PRESETS = {"gpt-oss-120b": GPT_OSS_120B, "gpt-oss-20b": GPT_OSS_20B}


def is_original_config(raw: dict) -> bool:
    """The release's original/config.json, told by its own keys (it has no model_type)."""
    return "model_type" not in raw and "num_experts" in raw and "experts_per_token" in raw


def checkpoint_layout(model_dir: Path) -> tuple[str, Path]:
    """("hf" or "original", the folder holding that layout's config and tensors): the release's
    root, its original/ folder given directly, or a Hugging Face folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    config = model_dir / "config.json"
    if config.exists():
        return ("original" if is_original_config(_read_json(config)) else "hf"), model_dir
    if (model_dir / "original" / "config.json").exists():
        return "original", model_dir / "original"
    raise CheckpointError(f"{model_dir}: no config.json (nor original/config.json)")


def read_config(model_dir: Path) -> ModelConfig:
    layout, folder = checkpoint_layout(model_dir)
    config = folder / "config.json"
    if layout == "hf":
        return ModelConfig.from_hf_json(_read_json(config), str(config))
    return ModelConfig.from_original_json(_read_json(config), str(config))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
