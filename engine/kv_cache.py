"""A preallocated KV cache of a fixed number of slots (rows).

Slot b's keys and values for position p live at ``[layer][b, p]``: a row's
tokens start at index 0 of its slot whatever its neighbours' lengths, so
positions never need padding offsets, and per-slot lengths (kept by the
generation loop) say what is valid. A slot handed to a new row is not
cleared: everything past the new row's length is masked out.
"""

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device="cpu"):
        shape = (batch, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype, device="cpu") -> "KVCache":
        return cls(config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim, dtype, device)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Stores this step's keys/values; returns the layer's whole (k, v) cache."""
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v
        return self.k[layer], self.v[layer]
