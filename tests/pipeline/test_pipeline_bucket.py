"""ossbatch.pipeline.bucket: length buckets, and the runs of buckets that share one KV cache."""

from ossbatch.pipeline.bucket import pack_batches


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
