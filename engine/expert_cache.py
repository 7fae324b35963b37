"""Unpacked MXFP4 experts kept for the torch backend on the CPU."""

from collections import OrderedDict


class ExpertCache:
    """A bounded LRU of unpacked experts for the torch backend.

    Unpacking MXFP4 costs more than the matmul it feeds on a CPU, so hot
    experts are kept unpacked up to a byte budget; the packed weights stay the
    source of truth and nothing beyond the budget is ever unpacked at once.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, unpack):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        entry = unpack()
        size = sum(t.numel() * t.element_size() for t in entry)
        if size <= self.budget_bytes:
            while self.used_bytes + size > self.budget_bytes:
                _, old = self._entries.popitem(last=False)
                self.used_bytes -= sum(t.numel() * t.element_size() for t in old)
            self._entries[key] = entry
            self.used_bytes += size
        return entry
