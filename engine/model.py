"""The gpt-oss transformer, as an executable spec.

A forward pass runs its tokens packed (``[N, H]``, no padding) through every
matmul; only attention sees them as KV-cache rows, through a `Step`.
The ops (RMSNorm, routing, the MXFP4 MoE, attention) come from `kernels`, so
the torch and Triton backends share this file.
"""

import contextlib
import math

import torch

from ossbatch.engine.attend import attend
from ossbatch.engine.config import ModelConfig
from ossbatch.engine.expert_cache import ExpertCache
from ossbatch.engine.host_memory import process_memory, release_large_allocations
from ossbatch.engine.kv_cache import KVCache
from ossbatch.engine.precision import onednn_fp32_precision, resolve_fp32_matmul
from ossbatch.engine.step import Step
from ossbatch.engine.weights import LayerWeights, ModelWeights, linear, load_weights
from ossbatch.kernels import Ops, ops
from ossbatch.kernels.mxfp4 import dequantize_mxfp4


class RotaryEmbedding:
    """RoPE with YaRN's frequency interpolation and attention concentration."""

    def __init__(self, config: ModelConfig, max_positions: int, device="cpu"):
        d_half = config.head_dim // 2
        freq = config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        factor = config.rope_scaling_factor
        if factor > 1.0:
            concentration = 0.1 * math.log(factor) + 1.0
            ctx, base = config.initial_context_length, config.rope_theta
            low = d_half * math.log(ctx / (config.rope_ntk_beta * 2 * math.pi)) / math.log(base)
            high = d_half * math.log(ctx / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
            ramp = ((torch.arange(d_half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
            extrapolate = 1 - ramp  # low dimensions keep their frequency, high ones are interpolated
            inv_freq = (1.0 / (factor * freq)) * (1 - extrapolate) + (1.0 / freq) * extrapolate
        else:
            concentration, inv_freq = 1.0, 1.0 / freq
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = (angles.cos() * concentration).to(device)
        self.sin = (angles.sin() * concentration).to(device)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [N, heads, D]; rotates the two halves of each head."""
        cos = self.cos[positions][:, None, :].to(x.dtype)
        sin = self.sin[positions][:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AttentionBlock:
    def __init__(self, config: ModelConfig, w: LayerWeights, layer: int, rope: RotaryEmbedding, kernels: Ops,
                 ieee_attention: bool = False):
        self.config, self.w, self.layer, self.rope, self.ops = config, w, layer, rope, kernels
        self.window = config.window(layer)
        # oneDNN's bf16 mode (engine/precision.py) speeds up the weight matmuls but slows torch's
        # CPU SDPA ~8x at decode shapes, so attention itself goes back to IEEE.
        self.ieee_attention = ieee_attention

    def __call__(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        c, w = self.config, self.w
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        h = self.ops.rmsnorm(x, w.attn_norm, c.rms_norm_eps)
        qkv = linear(h, w.qkv_weight, w.qkv_bias)
        q = qkv[:, :q_dim].reshape(-1, c.num_attention_heads, c.head_dim)
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(-1, c.num_key_value_heads, c.head_dim)
        v = qkv[:, q_dim + kv_dim :].reshape(-1, c.num_key_value_heads, c.head_dim)
        q, k = self.rope(q, step.positions), self.rope(k, step.positions)
        with onednn_fp32_precision("ieee") if self.ieee_attention else contextlib.nullcontext():
            out = attend(self.ops, q, k, v, step, cache, self.layer, w.sinks, self.window, c.sm_scale)
        out = out.reshape(-1, q_dim)
        return x + torch.addmm(w.out_bias, out, w.out_weight.t())


class MoEBlock:
    def __init__(self, config: ModelConfig, w: LayerWeights, layer: int, kernels: Ops, experts: ExpertCache | None):
        self.config, self.w, self.layer, self.ops, self.experts = config, w, layer, kernels, experts

    def _unpacked(self, expert: int, dtype: torch.dtype):
        w = self.w
        return self.experts.get(
            (self.layer, expert),
            lambda: (
                dequantize_mxfp4(w.w1_blocks[expert], w.w1_scales[expert], dtype),
                dequantize_mxfp4(w.w2_blocks[expert], w.w2_scales[expert], dtype),
            ),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.w
        h = self.ops.rmsnorm(x, w.mlp_norm, c.rms_norm_eps)
        router_logits = torch.addmm(w.router_bias, h, w.router_weight.t())
        weights, experts = self.ops.route(router_logits, c.num_experts_per_tok)
        plan = self.ops.plan_routing(experts, c.num_local_experts)
        extra = {}
        if self.experts is not None and self.experts.budget_bytes > 0:
            extra["expert_cache"] = lambda e: self._unpacked(e, x.dtype)
        y = self.ops.moe(h, weights, plan, w.w1_blocks, w.w1_scales, w.w1_bias, w.w2_blocks, w.w2_scales, w.w2_bias, c.swiglu_limit, **extra)
        return x + y


class Transformer:
    def __init__(self, weights: ModelWeights, backend: str = "torch", max_positions: int = 4096, expert_cache_bytes: int = 0, device="cpu",
                 fp32_matmul: str = "auto"):
        self.config = c = weights.config
        self.device = torch.device(device)
        if self.device.type == "cpu":
            release_large_allocations()  # so kept experts can be unpacked outside the heap (engine/host_memory.py)
        self.weights = weights = weights.to(self.device)
        self.dtype = weights.final_norm.dtype
        # Only float32 CPU matmuls have a choice of internal precision (engine/precision.py).
        self.fp32_matmul = resolve_fp32_matmul(fp32_matmul, self.device) if self.dtype == torch.float32 else "ieee"
        kernels = ops(backend)
        self.ops = kernels
        self.rope = RotaryEmbedding(c, max_positions, self.device)
        self.experts = experts = ExpertCache(expert_cache_bytes) if backend == "torch" else None
        self.buffer_bytes = {"kv_cache": 0, "logits": 0}  # the largest a generate() held (engine/generate.py Forward)
        self.blocks = [
            (AttentionBlock(c, lw, n, self.rope, kernels, self.fp32_matmul != "ieee"), MoEBlock(c, lw, n, kernels, experts))
            for n, lw in enumerate(weights.layers)
        ]

    @classmethod
    def from_checkpoint(cls, model_dir, dtype=torch.float32, backend="torch", expert_cache_bytes=0, device="cpu", fp32_matmul="auto") -> "Transformer":
        return cls(load_weights(model_dir, dtype), backend, expert_cache_bytes=expert_cache_bytes, device=device, fp32_matmul=fp32_matmul)

    def note_buffers(self, **sizes: int) -> None:
        for name, size in sizes.items():
            self.buffer_bytes[name] = max(self.buffer_bytes.get(name, 0), size)

    def memory_report(self) -> dict[str, int]:
        """Where this process's memory goes, in bytes: the weights used in place from the
        checkpoint's mapping (file-backed) and, anonymous, the weights copied out of it, the expert
        cache (its peak and budget), the largest KV cache and logits buffer a generate() held, and
        the rest of the process's anonymous memory now ("other": Python, torch, the tokenizer...)."""
        weights = self.weights.host_bytes()
        process = process_memory()
        experts = self.experts.peak_bytes if self.experts is not None else 0
        owned = weights["copied"] + (self.experts.used_bytes if self.experts is not None else 0)
        report = {
            "weights_mapped": weights["mapped"],
            "weights_copied": weights["copied"],
            "expert_cache": experts,
            "expert_cache_budget": self.experts.budget_bytes if self.experts is not None else 0,
            "kv_cache": self.buffer_bytes["kv_cache"],
            "logits": self.buffer_bytes["logits"],
            "process_anonymous": process["anonymous"],
            "process_file": process["file"],
            "process_peak_rss": process["peak_rss"],
        }
        report["other"] = max(process["anonymous"] - owned, 0)
        return report

    def ensure_positions(self, max_positions: int):
        if self.rope.cos.shape[0] < max_positions:
            self.rope = RotaryEmbedding(self.config, max_positions, self.device)
            for attention, _ in self.blocks:
                attention.rope = self.rope

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step, cache: KVCache, logits_at: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Runs N packed tokens; returns float32 logits ``[M, V]`` for the tokens at `logits_at`
        (written into `out` when given: a fresh [256, 201088] tensor costs more in page faults
        than the LM head itself on a small model)."""
        tokens, step, logits_at = tokens.to(self.device), step.to(self.device), logits_at.to(self.device)
        precision = onednn_fp32_precision(self.fp32_matmul) if self.fp32_matmul != "ieee" else contextlib.nullcontext()
        with precision:
            x = self.weights.embedding[tokens].to(self.dtype)
            for attention, moe in self.blocks:
                x = attention(x, step, cache)
                x = moe(x)
            x = self.ops.rmsnorm(x[logits_at], self.weights.final_norm, self.config.rms_norm_eps)
            if out is None:
                return (x @ self.weights.unembedding.t()).float()
            if x.dtype == out.dtype:
                return torch.mm(x, self.weights.unembedding.t(), out=out)
            return out.copy_(x @ self.weights.unembedding.t())
