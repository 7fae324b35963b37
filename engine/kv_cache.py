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

    A prefix may continue another (its `parent`, e.g. a job-wide header above each prompt): it
    then holds only the positions past its parent's length, and a row reads the whole chain,
    level by level (`step.Step.prefixes`), so the parent's keys are stored once. Full-attention
    layers keep every position a prefix holds. Windowed layers keep its last ``window - 1``
    (fewer where it holds fewer), all that a query past the prefix can see; the positions before
    are its parent's to keep. ``start[layer][p]`` is the position of prefix p's first kept key
    (its index 0).
    """

    def __init__(self, config, lengths: list[int], dtype: torch.dtype, device="cpu", parents: list[int] | None = None):
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.parents = torch.tensor(parents if parents is not None else [-1] * len(lengths), dtype=torch.int64)
        self.begins = torch.where(self.parents >= 0, self.lengths[self.parents.clamp(min=0)], 0)  # first position held
        if bool(((self.begins >= self.lengths) & (self.parents >= 0)).any()):
            raise ValueError("a prefix must be longer than its parent")
        self.k, self.v, self.start = [], [], []
        for layer in range(config.num_hidden_layers):
            window = config.window(layer)
            held = self.lengths - self.begins
            kept = held.clamp(max=window - 1) if window else held
            shape = (len(lengths), max(int(kept.max()), 1), config.num_key_value_heads, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            self.start.append(self.lengths - kept)

    def store(self, prefixes: list[int], filled: "KVCache") -> None:
        """Copies prefixes[i]'s keys and values from row i of a cache it was prefilled in, which
        holds the positions past its parent's length from index 0."""
        self.gather(prefixes, filled, list(range(len(prefixes))), self, self.parents[prefixes].tolist())

    def gather(self, prefixes: list[int], filled: "KVCache", rows: list[int], source: "PrefixKV | None",
               source_ids: list[int]) -> None:
        """Copies prefix prefixes[i] from row rows[i] of `filled`, which holds the positions past
        prefix source_ids[i] of `source` from index 0 (-1: from position 0), and the positions
        before from that prefix and its parents. A finished row's own KV slot, under the prefixes
        it read, becomes one prefix of a store of its own this way (for scoring)."""
        for layer, start in enumerate(self.start):
            for row, prefix, source_id in zip(rows, prefixes, source_ids):
                begin, end = int(start[prefix]), int(self.lengths[prefix])
                offset = int(source.lengths[source_id]) if source_id >= 0 else 0
                low = max(begin, offset)  # positions from here on are in `filled`
                self.k[layer][prefix, low - begin : end - begin] = filled.k[layer][row, low - offset : end - offset]
                self.v[layer][prefix, low - begin : end - begin] = filled.v[layer][row, low - offset : end - offset]
                level = source_id
                while level >= 0 and begin < offset:  # what each prefix of the chain keeps, where this one keeps it
                    level_start, level_end = int(source.start[layer][level]), int(source.lengths[level])
                    low, high = max(begin, level_start), min(end, level_end)
                    if high > low:
                        self.k[layer][prefix, low - begin : high - begin] = source.k[layer][level, low - level_start : high - level_start]
                        self.v[layer][prefix, low - begin : high - begin] = source.v[layer][level, low - level_start : high - level_start]
                    level = int(source.parents[level])

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
