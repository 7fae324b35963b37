"""ossbatch.pipeline.bucket: length buckets, the runs of buckets that share one KV cache, and prefix
groups over a shard's rendered prompts with length buckets formed within them."""

import random

from ossbatch.pipeline.bucket import group_shared_prefixes, pack_batches, pack_batches_by_prefix


def test_buckets_sort_by_length_and_respect_the_budget():
    lengths = [50, 3, 48, 5, 200, 4, 52]
    batches = pack_batches(lengths, [10] * len(lengths), batch_tokens=200, max_batch_rows=8, max_padding=1.0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * (longest + 10) <= 200
    assert [sorted(lengths[i] for i in b) for b in batches][0] == [3, 4, 5]
    assert [4] in batches  # the 200-token prompt alone exceeds the budget: a batch of its own


def test_buckets_keep_padding_within_ten_percent_on_a_long_tailed_mix():
    import random

    rng = random.Random(7)
    lengths = [max(8, int(rng.lognormvariate(5.0, 0.9))) for _ in range(1500)]
    budgets = [256] * len(lengths)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    bucketed = pack_batches(lengths, budgets, batch_tokens=65536, max_batch_rows=64)
    arrival = [list(range(i, min(i + 64, len(lengths)))) for i in range(0, len(lengths), 64)]
    assert padded(bucketed) <= 1.10 * sum(lengths)
    assert padded(arrival) > 1.5 * sum(lengths)  # what sorting saves


def test_refill_runs_fit_the_token_budget_and_keep_every_row_once():
    from ossbatch.pipeline.infer import _refill_runs

    lengths = [10 + (i * 37) % 400 for i in range(300)]
    budgets = [64 + (i * 11) % 200 for i in range(300)]
    buckets = pack_batches(lengths, budgets, 8192, 32)
    runs = list(_refill_runs(buckets, lengths, budgets, 8192, 32))
    assert sorted(i for run, _ in runs for bucket in run for i in bucket) == list(range(300))
    assert len(runs) > 1
    for run, slots in runs:
        widths = [max(lengths[i] for i in b) + max(budgets[i] for i in b) for b in run]
        rows = sum(map(len, run))
        assert 1 <= slots <= min(32, rows) and slots * max(widths) <= 8192
        first_cap = min(32, 8192 // widths[0])
        # one long row does not narrow the cache for every short one, where the cache binds
        assert slots == rows or slots * 4 >= first_cap * 3


def test_buckets_that_fit_the_budget_share_one_run():
    from ossbatch.pipeline.infer import _refill_runs

    lengths = [60 + 8 * i for i in range(32)]  # widths 84..332: a 4x spread, but 32 rows fit 32768 tokens
    buckets = pack_batches(lengths, [24] * 32, 32768, 256)
    assert len(buckets) > 1
    assert [(sum(map(len, run)), slots) for run, slots in _refill_runs(buckets, lengths, [24] * 32, 32768, 256)] == [(32, 32)]


def _job(seed: int, header: list[int], developer_len: int, rows: int, first_token: int) -> list[list[int]]:
    rng = random.Random(seed)
    developer = [first_token] + [rng.randrange(1000) for _ in range(developer_len - 1)]
    return [header + developer + [5000 + rng.randrange(1000) for _ in range(rng.randrange(3, 30))] for _ in range(rows)]


def test_two_developer_messages_behind_one_header_make_two_groups():
    header = list(range(100, 120))  # the rendered system message every row has
    prompts = _job(1, header, 60, 7, first_token=1) + _job(2, header, 60, 5, first_token=2)
    random.Random(3).shuffle(prompts)
    groups = group_shared_prefixes(prompts)
    assert sorted((len(g.rows), g.length) for g in groups) == [(5, 80), (7, 80)]
    for g in groups:
        assert len({tuple(prompts[r][: g.length]) for r in g.rows}) == 1
    # Sharing the 20-token header across all 12 would save 11 x 20; two groups save 6 x 80 + 4 x 80.
    assert sorted(r for g in groups for r in g.rows) == list(range(12))


def test_a_header_alone_is_shared_by_every_row():
    header = list(range(100, 140))
    rng = random.Random(4)
    prompts = [header + [rng.randrange(1000, 2000) for _ in range(rng.randrange(2, 9))] for _ in range(6)]
    prompts[0][40] = 999  # distinct first item tokens
    assert [(sorted(g.rows), g.length) for g in group_shared_prefixes(prompts)][0][1] >= 40


def test_n_samples_share_all_but_the_last_token_and_strangers_share_nothing():
    prompt = list(range(30))
    prompts = [prompt] * 4 + [[7, 8, 9], [1000 + i for i in range(40)]]
    groups = group_shared_prefixes(prompts)
    assert (sorted(groups[0].rows), groups[0].length) == ([0, 1, 2, 3], 29)
    assert (sorted(groups[-1].rows), groups[-1].length) == ([4, 5], 0)


def test_n_samples_below_a_long_header_group_by_prompt():
    """synth --n: four prompts behind one 300-token developer message, four samples each. One group
    over the header would save 15 x 300 tokens, four groups by prompt 12 x 339; but the engine
    prefills the four prompts' common root once, which saves 3 x 300 more: group by prompt."""
    header = list(range(1000, 1300))
    prompts = [header + [5000 + 100 * p + i for i in range(40)] for p in range(4) for _ in range(4)]
    groups = group_shared_prefixes(prompts)
    assert sorted((sorted(g.rows), g.length) for g in groups) == [(list(range(4 * p, 4 * p + 4)), 339) for p in range(4)]


def test_short_common_prefixes_are_not_shared():
    prompts = [[1, 2, 3, 10 + i] + list(range(50, 60)) for i in range(4)]
    assert [(sorted(g.rows), g.length) for g in group_shared_prefixes(prompts, min_tokens=16)] == [([0, 1, 2, 3], 0)]


def test_deeply_nested_prefixes_need_no_recursion():
    prompts = [list(range(n)) for n in range(1, 3000)]
    groups = group_shared_prefixes(prompts)
    assert sorted(r for g in groups for r in g.rows) == list(range(2999))


def test_buckets_stay_within_groups_and_fit_more_rows():
    header = list(range(100, 120))
    prompts = _job(5, header, 400, 30, first_token=1) + _job(6, header, 400, 30, first_token=2)
    budgets = [50] * len(prompts)
    # No padding limit here: this is about the token budget (items of 3-30 tokens pad a lot among themselves).
    shared = pack_batches_by_prefix(prompts, budgets, batch_tokens=4000, max_batch_rows=64, max_padding=1e9)
    group_of = {r: n for n, g in enumerate(group_shared_prefixes(prompts)) for r in g.rows}
    assert sorted(r for rows, _ in shared for r in rows) == list(range(60))
    # A group's buckets come one after another.
    order = [group_of[rows[0]] for rows, _ in shared]
    assert order == sorted(order, key=order.index)
    for rows, group in shared:
        assert {group_of[r] for r in rows} == {group_of[group.rows[0]]} and group.length == 420
        assert len(rows) * (max(len(prompts[r]) for r in rows) - group.length + 50) <= 4000
    plain = pack_batches_by_prefix(prompts, budgets, batch_tokens=4000, max_batch_rows=64, share=False, max_padding=1e9)
    assert [rows for rows, _ in plain] == pack_batches([len(p) for p in prompts], budgets, 4000, 64, 1e9)
    assert {g.length for _, g in plain} == {0}
    assert len(shared) < len(plain)  # the prefix counted once lets far more rows into a bucket
