"""Unpacked MXFP4 experts kept for the torch backend on the CPU."""

from collections import OrderedDict

from ossbatch.engine.host_memory import mapped_allocations


def _nbytes(entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry)


class ExpertCache:
    """A bounded LRU of unpacked experts for the torch backend.

    Unpacking MXFP4 costs more than the matmul it feeds on a CPU, so hot
    experts are kept unpacked up to a byte budget; the packed weights stay the
    source of truth and nothing beyond the budget is ever unpacked at once.
    A budget of 0 keeps nothing (every expert is unpacked when used).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict = OrderedDict()

    def resize(self, budget_bytes: int) -> None:
        """A new budget; least recently used experts go until the cache is within it."""
        self.budget_bytes = max(budget_bytes, 0)
        self._evict_to(self.budget_bytes)

    def _evict_to(self, limit: int) -> None:
        while self._entries and self.used_bytes > limit:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= _nbytes(old)

    def get(self, key, unpack):
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        with mapped_allocations():  # a kept expert must not pin the heap around unpacking's temporaries
            entry = unpack()
        size = _nbytes(entry)
        if size <= self.budget_bytes:
            self._evict_to(self.budget_bytes - size)
            self._entries[key] = entry
            self.used_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return entry
