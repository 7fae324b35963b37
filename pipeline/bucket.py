"""Length buckets: sort a shard's rows by prompt length and pack them into
batches under a token budget, so a batch's rows are of similar length
and padding stays small; and groups of rows that share a prompt prefix, so the
engine prefills and stores the prefix once."""

from dataclasses import dataclass

from ossbatch.engine.generate import MIN_ROOT_TOKENS


def pack_batches(
    prompt_lengths: list[int],
    max_new_tokens: list[int],
    batch_tokens: int,
    max_batch_rows: int,
    max_padding: float = 0.10,
) -> list[list[int]]:
    """Row indices per batch.

    A batch's cost is its rows times (its longest prompt plus its longest answer
    budget): the padded prompt slots and the KV it reserves; it stays under
    `batch_tokens` and `max_batch_rows`.  A batch also closes before its padded
    prompt slots would exceed its real prompt tokens by more than `max_padding`,
    so a long tail of lengths does not pad the short rows it is packed with.
    A row that alone exceeds the budget gets a batch of its own.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], max_new_tokens[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    real = longest_answer = 0
    for i in order:
        length = prompt_lengths[i]  # the longest so far: rows come sorted by length
        answer = max(longest_answer, max_new_tokens[i])
        rows = len(current) + 1
        too_costly = rows * (length + answer) > batch_tokens or rows > max_batch_rows
        too_padded = rows * length > (1 + max_padding) * (real + length)
        if current and (too_costly or too_padded):
            batches.append(current)
            current, real, answer = [], 0, max_new_tokens[i]
        current.append(i)
        real += length
        longest_answer = answer
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class PrefixGroup:
    """Rows whose prompts begin with the same `length` tokens (`length` 0: rows that share nothing)."""

    rows: list[int]
    length: int


def group_shared_prefixes(prompts: list[list[int]], min_tokens: int = 16) -> list[PrefixGroup]:
    """Partitions the rows into groups that share a prompt prefix, as a radix tree over the sorted
    prompts would find them, choosing the grouping that saves the most prompt tokens.

    Sorted, rows with a common prefix are adjacent, and a range's common prefix is the least
    longest-common-prefix (LCP) of neighbours in it. A range either shares that prefix as one
    group (saving (rows - 1) x prefix tokens) or splits where its least LCP falls, each part
    choosing in turn: a job-wide system header of 100 tokens does not swallow two developer
    messages of 1,500 tokens each. Split groups still share their range's prefix, as the engine
    prefills the common root of a run's prefixes once: n samples of each prompt below a job-wide
    developer message group by prompt, and the message is computed once. A row shares at most its prompt less one token (the engine
    computes each row's last prompt token); prefixes under `min_tokens` are not worth sharing.
    Groups come in sorted-prompt order; rows sharing nothing come last, as one group of length 0.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    lcp = [_common_length(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
    groups: list[PrefixGroup] = []
    for start, end, length in _best_ranges(order, lcp, prompts, min_tokens):
        if end - start > 1 and length >= min_tokens:
            groups.append(PrefixGroup(order[start:end], length))
    grouped = {row for g in groups for row in g.rows}
    alone = [row for row in order if row not in grouped]
    return groups + ([PrefixGroup(alone, 0)] if alone else [])


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _best_ranges(order: list[int], lcp: list[int], prompts: list[list[int]], min_tokens: int) -> list[tuple[int, int, int]]:
    """The (start, end, shared length) ranges of sorted rows that save the most prompt tokens, walking
    the LCP tree with an explicit stack (nested prefixes can make it as deep as the shard is long)."""
    best: dict[tuple[int, int], tuple[int, list]] = {}
    stack = [(0, len(order), False)]
    while stack:
        start, end, expanded = stack.pop()
        if end - start < 2:
            best[start, end] = (0, [])
            continue
        # Shareable: the least neighbour LCP, and never a whole prompt (its last token is computed).
        length = min(min(lcp[start : end - 1]), min(len(prompts[r]) for r in order[start:end]) - 1)
        cuts = [i + 1 for i in range(start, end - 1) if lcp[i] <= length]
        parts = list(zip([start] + cuts, cuts + [end]))
        if not expanded and cuts:
            stack.append((start, end, True))
            stack.extend((a, b, False) for a, b in parts)
            continue
        whole = (end - start - 1) * length if length >= min_tokens else 0
        split = sum(best[p][0] for p in parts) if cuts else 0
        groups = sum(len(best[p][1]) for p in parts) if cuts else 0
        if groups > 1 and length >= MIN_ROOT_TOKENS:
            split += (groups - 1) * length  # the engine prefills the groups' common root once (nested prefixes)
        if cuts and split > whole:
            best[start, end] = (split, [r for p in parts for r in best[p][1]])
        else:
            best[start, end] = (whole, [(start, end, length)] if whole else [])
    return best[0, len(order)][1]


def pack_batches_by_prefix(prompts: list[list[int]], max_new_tokens: list[int], batch_tokens: int, max_batch_rows: int,
                           share: bool = True, min_tokens: int = 16, max_padding: float = 0.10) -> list[tuple[list[int], PrefixGroup]]:
    """Length buckets formed within prefix groups: (row indices, their prefix group) per bucket,
    a group's buckets one after another (so a refill run of consecutive buckets shares the prefix
    across them).

    Within a group a bucket's cost counts only what its rows hold past the prefix (the prefix is
    stored once), so sharing lets more rows into a bucket; lengths bucket over the rows' own
    tokens, so sharing and length bucketing work together. `share=False` (--no-prefix-sharing)
    gives `pack_batches` over the whole prompts, all in one group of prefix length 0.
    """
    lengths = [len(p) for p in prompts]
    if not share:
        nothing = PrefixGroup(list(range(len(prompts))), 0)
        return [(bucket, nothing) for bucket in pack_batches(lengths, max_new_tokens, batch_tokens, max_batch_rows, max_padding)]
    buckets = []
    for group in group_shared_prefixes(prompts, min_tokens):
        own = [lengths[r] - group.length for r in group.rows]
        for bucket in pack_batches(own, [max_new_tokens[r] for r in group.rows], batch_tokens, max_batch_rows, max_padding):
            rows = [group.rows[i] for i in bucket]
            buckets.append((rows, group))
    return buckets
