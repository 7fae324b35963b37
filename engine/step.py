"""Where the tokens of one forward pass sit in the KV cache.

The model runs a step's tokens packed (``[N, H]``, no padding); only
attention sees them as cache rows. `Step` is that mapping, built by the
generation loop and read by `engine.model`'s attention block.
"""

from dataclasses import dataclass

import torch


@dataclass
class Step:
    """Where the N tokens of one forward pass sit in the batch.

    ``rows``/``positions`` give each packed token's batch row and position
    (its KV cache index).  Attention runs over the rows that have tokens in
    this step (``members``, sorted): each token is query ``slots`` of member
    ``member_index``; queries sit at ``q_positions`` ``[M, q_len]`` and each
    member's cache is valid up to ``kv_len`` ``[M]`` after this step's writes.
    ``whole_batch`` says every row of the cache takes part (no cache copy).
    """

    rows: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    members: torch.Tensor  # [M] int64
    member_index: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64
    q_positions: torch.Tensor  # [M, q_len] int64
    kv_len: torch.Tensor  # [M] int64
    whole_batch: bool

    @classmethod
    def build(cls, rows: torch.Tensor, positions: torch.Tensor, kv_len: torch.Tensor, batch: int) -> "Step":
        """`rows` must be sorted, each row's positions consecutive and ascending;
        `kv_len` is every batch row's valid cache length after this step."""
        members, member_index, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        slots = torch.arange(rows.numel()) - first[member_index]
        q_positions = torch.zeros(members.numel(), int(counts.max()), dtype=torch.int64)
        # Padding query slots repeat the row's last position: harmless, and never read back.
        q_positions[:] = (kv_len[members] - 1).clamp(min=0)[:, None]
        q_positions[member_index, slots] = positions
        return cls(rows, positions, members, member_index, slots, q_positions, kv_len[members], members.numel() == batch)

    def to(self, device) -> "Step":
        tensors = (self.rows, self.positions, self.members, self.member_index, self.slots, self.q_positions, self.kv_len)
        return Step(*(t.to(device) for t in tensors), self.whole_batch)
