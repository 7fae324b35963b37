"""A preallocated KV cache of a fixed number of slots (rows), and one copy of
each prompt prefix that rows share.

Slot b's keys and values for cache index i live at ``[layer][b, i]``: a row's
tokens start at index 0 of its slot whatever its neighbours' lengths, so
positions never need padding offsets, and per-slot lengths (kept by the
generation loop) say what is valid. A row that shares a prefix holds only its
own tokens, from index 0 at position `prefix length`; the prefix's keys are in
`PrefixKV`, once. A slot handed to a new row is not cleared: everything past
the new row's length is masked out.
"""

import torch


class PrefixKV:
    """One copy of the keys and values of each shared prefix.

    Full-attention layers keep the whole prefix. Windowed layers keep its last
    ``window - 1`` positions, all that a query past the prefix can see;
    ``start[layer][p]`` is the position of prefix p's first kept key (its index 0).
    """

    def __init__(self, config, lengths: list[int], dtype: torch.dtype, device="cpu"):
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.k, self.v, self.start = [], [], []
        for layer in range(config.num_hidden_layers):
            window = config.window(layer)
            kept = self.lengths.clamp(max=window - 1) if window else self.lengths
            shape = (len(lengths), max(int(kept.max()), 1), config.num_key_value_heads, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            self.start.append(self.lengths - kept)

    def store(self, prefixes: list[int], filled: "KVCache", parent: int | None = None) -> None:
        """Copies prefixes[i]'s keys and values from row i of a cache they were prefilled in. With a
        `parent` (a stored prefix they all begin with), row i holds only the positions past the
        parent's length, from index 0, and the positions before it are copied from the parent."""
        parents = [-1 if parent is None else parent] * len(prefixes)
        self.gather(prefixes, filled, list(range(len(prefixes))), self, parents)

    def gather(self, prefixes: list[int], filled: "KVCache", rows: list[int], parent_store: "PrefixKV | None",
               parents: list[int]) -> None:
        """Copies prefix prefixes[i] from row rows[i] of `filled`, which holds the positions past
        its parent's length from index 0; the positions before come from prefix parents[i] of
        `parent_store` (-1: none, the row holds the prefix from position 0). A finished row's own
        KV slot, under the shared prefix it read, becomes a prefix this way."""
        for layer, start in enumerate(self.start):
            for row, prefix, parent in zip(rows, prefixes, parents):
                offset = int(parent_store.lengths[parent]) if parent >= 0 else 0
                begin, end = int(start[prefix]), int(self.lengths[prefix])
                split = max(begin, offset)  # positions from here on are in `filled`
                if split > begin:  # the child keeps no earlier position than its parent does
                    parent_begin = int(parent_store.start[layer][parent])
                    self.k[layer][prefix, : split - begin] = parent_store.k[layer][parent, begin - parent_begin : split - parent_begin]
                    self.v[layer][prefix, : split - begin] = parent_store.v[layer][parent, begin - parent_begin : split - parent_begin]
                self.k[layer][prefix, split - begin : end - begin] = filled.k[layer][row, split - offset : end - offset]
                self.v[layer][prefix, split - begin : end - begin] = filled.v[layer][row, split - offset : end - offset]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device="cpu"):
        shape = (batch, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.prefix: PrefixKV | None = None  # the shared prefixes, when rows share any

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype, device="cpu") -> "KVCache":
        return cls(config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim, dtype, device)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Stores this step's keys/values at (row, cache index); returns the layer's whole (k, v) cache."""
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return own + (self.prefix.nbytes if self.prefix is not None else 0)
