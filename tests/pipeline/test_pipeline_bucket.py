"""Prefix groups over a shard's rendered prompts, and length buckets formed within them."""

import random

from ossbatch.pipeline.bucket import group_shared_prefixes, pack_batches, pack_batches_by_prefix


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
