"""Where the tokens of one forward pass sit in the KV cache.

The model runs a step's tokens packed (``[N, H]``, no padding); only
attention sees them as cache rows. `Step` is that mapping, built by the
generation loop and read by `engine.attend`.
"""

from dataclasses import dataclass

import torch


def packed(sequences: list[list[int]], offsets: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences packed end to end, as a forward pass takes them: their tokens, each token's
    position (counting from its sequence's offset, default 0), and each sequence's length."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    starts = offsets if offsets is not None else [0] * len(sequences)
    positions = torch.cat([torch.arange(n, n + len(s)) for s, n in zip(sequences, starts)])
    return tokens, positions, lengths


@dataclass
class PrefixReads:
    """The step's tokens whose rows share a prefix, folded per prefix: prefix ``prefixes[g]``'s
    queries are ``tokens`` with ``group_index == g``, at query slot ``slots``, so one attention
    pass over each prefix block serves all its rows."""

    tokens: torch.Tensor  # [Np] int64, indices into the step's packed tokens
    prefixes: torch.Tensor  # [G] int64, rows of the PrefixKV
    group_index: torch.Tensor  # [Np] int64
    slots: torch.Tensor  # [Np] int64
    q_positions: torch.Tensor  # [G, q_len] int64, absolute positions

    @classmethod
    def build(cls, prefix_of_token: torch.Tensor, positions: torch.Tensor) -> "PrefixReads | None":
        tokens = (prefix_of_token >= 0).nonzero().flatten()
        if not tokens.numel():
            return None
        tokens = tokens[torch.argsort(prefix_of_token[tokens], stable=True)]
        prefixes, group_index, counts = torch.unique_consecutive(prefix_of_token[tokens], return_inverse=True, return_counts=True)
        slots = torch.arange(tokens.numel()) - (torch.cumsum(counts, 0) - counts)[group_index]
        # Padding query slots repeat the group's last position: harmless, and never read back.
        last = torch.zeros(prefixes.numel(), dtype=torch.int64).scatter_reduce(0, group_index, positions[tokens], "amax")
        q_positions = last[:, None].repeat(1, int(counts.max()))
        q_positions[group_index, slots] = positions[tokens]
        return cls(tokens, prefixes, group_index, slots, q_positions)

    def to(self, device) -> "PrefixReads":
        return PrefixReads(*(t.to(device) for t in (self.tokens, self.prefixes, self.group_index, self.slots, self.q_positions)))


@dataclass
class Step:
    """Where the N tokens of one forward pass sit in the batch.

    ``rows``/``positions`` give each packed token's batch row and position;
    ``cache_positions`` its index in the row's cache (its position less the
    length of a prefix the row shares, else the same).  Attention runs over the
    rows that have tokens in this step (``members``, sorted): each token is
    query ``slots`` of member ``member_index``; queries sit at cache indices
    ``q_positions`` ``[M, q_len]`` and each member's cache is valid up to
    ``kv_len`` ``[M]`` after this step's writes.  ``whole_batch`` says every row
    of the cache takes part (no cache copy).  ``prefixes``: per level of the
    shared prefixes' chain (a row's prefix, then the prefix that one continues,
    ...), the tokens that also attend to a prefix of that level.
    """

    rows: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    members: torch.Tensor  # [M] int64
    member_index: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64
    q_positions: torch.Tensor  # [M, q_len] int64
    kv_len: torch.Tensor  # [M] int64
    whole_batch: bool
    cache_positions: torch.Tensor | None = None  # [N] int64; None: the positions
    prefixes: tuple[PrefixReads, ...] = ()

    def __post_init__(self):
        if self.cache_positions is None:
            self.cache_positions = self.positions

    @classmethod
    def build(cls, rows: torch.Tensor, positions: torch.Tensor, kv_len: torch.Tensor, batch: int,
              prefix_len: torch.Tensor | None = None, prefix_of: torch.Tensor | None = None,
              prefix_parents: torch.Tensor | None = None) -> "Step":
        """`rows` must be sorted, each row's positions consecutive and ascending;
        `kv_len` is every batch row's valid cache length after this step;
        `prefix_len`/`prefix_of` (per batch row) the length and PrefixKV row of
        the prefix a row shares (0 and -1: none); `prefix_parents` (per PrefixKV
        row, -1: none) the prefix each continues (`PrefixKV.parents`)."""
        cache_positions = positions if prefix_len is None else positions - prefix_len[rows]
        members, member_index, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        slots = torch.arange(rows.numel()) - first[member_index]
        q_positions = torch.zeros(members.numel(), int(counts.max()), dtype=torch.int64)
        # Padding query slots repeat the row's last position: harmless, and never read back.
        q_positions[:] = (kv_len[members] - 1).clamp(min=0)[:, None]
        q_positions[member_index, slots] = cache_positions
        levels = []
        level = prefix_of[rows] if prefix_of is not None else None
        while level is not None and bool((level >= 0).any()):
            levels.append(PrefixReads.build(level, positions))
            level = torch.where(level >= 0, prefix_parents[level.clamp(min=0)], -1) if prefix_parents is not None else None
        return cls(rows, positions, members, member_index, slots, q_positions, kv_len[members], members.numel() == batch,
                   cache_positions, tuple(levels))

    def to(self, device) -> "Step":
        tensors = (self.rows, self.positions, self.members, self.member_index, self.slots, self.q_positions, self.kv_len)
        return Step(*(t.to(device) for t in tensors), self.whole_batch, self.cache_positions.to(device),
                    tuple(level.to(device) for level in self.prefixes))
