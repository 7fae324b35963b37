import pytest

from ossbatch.engine.config import GPT_OSS_20B, GPT_OSS_120B, ModelConfig
from ossbatch.engine.memory_plan import GIB, format_plan, parse_bytes, plan_memory


def test_120b_weights_match_the_release():
    plan = plan_memory(GPT_OSS_120B, 80 * GIB, 8192)
    # 116.8B parameters, of which ~114.7B are expert weights stored at 17 bytes per 32 values.
    assert 116.0e9 < plan.parameter_count < 117.5e9
    experts = plan.weight_bytes_by_part["experts (MXFP4)"]
    assert experts == 36 * 128 * (5760 * 90 + 2880 * 90) * 17  # rows of 2880 values = 90 groups of 32
    assert 60 * GIB < plan.weight_bytes < 62 * GIB  # the released checkpoint is ~60.8 GiB (65.3 GB)
    assert plan.weight_bytes < 80 * GIB


def test_120b_fits_an_80_gib_gpu_at_8192():
    plan = plan_memory(GPT_OSS_120B, parse_bytes("80GiB"), 8192)
    assert plan.fits and plan.max_batch >= 1
    # The batch is the largest that fits: one more sequence would not.
    assert plan.used_bytes <= plan.gpu_memory_bytes < plan.used_bytes + plan.bytes_per_sequence


def test_kv_accounting_full_and_windowed_layers():
    plan = plan_memory(GPT_OSS_120B, 80 * GIB, 8192)
    per_layer_token = 2 * 8 * 64 * 2  # K and V, 8 kv heads x 64 dims, bf16
    assert (plan.full_layers, plan.windowed_layers) == (18, 18)
    assert plan.kv_bytes_per_token_full_layers == 18 * per_layer_token == 36 * 1024
    assert plan.kv_bytes_windowed_fixed == 18 * per_layer_token * 128
    # Stored by position (the kernels' layout), windowed layers cost as much as full ones...
    assert plan.kv_bytes_per_sequence == 8192 * 36 * per_layer_token
    # ...and a ring buffer keeps only the window, so more sequences fit.
    ring = plan_memory(GPT_OSS_120B, 80 * GIB, 8192, ring_buffer_windowed_layers=True)
    assert ring.kv_bytes_per_sequence == 8192 * 18 * per_layer_token + 18 * per_layer_token * 128
    assert ring.max_batch > plan.max_batch
    # A context shorter than the window stores only that much.
    short = plan_memory(GPT_OSS_120B, 80 * GIB, 64, ring_buffer_windowed_layers=True)
    assert short.kv_bytes_windowed_fixed == 18 * per_layer_token * 64


def test_20b_fits_16_gb():
    plan = plan_memory(GPT_OSS_20B, parse_bytes("16GB"), 4096)
    assert plan.weight_bytes < 16e9
    assert plan.max_batch >= 1


def test_too_small_a_gpu_gives_batch_zero():
    plan = plan_memory(GPT_OSS_120B, parse_bytes("40GiB"), 8192)
    assert plan.max_batch == 0 and not plan.fits
    assert "do not fit" in format_plan(plan)


def test_kv_dtype_scales_the_cache():
    bf16 = plan_memory(GPT_OSS_120B, 80 * GIB, 4096)
    fp8 = plan_memory(GPT_OSS_120B, 80 * GIB, 4096, dtype_bytes=1)
    assert fp8.kv_bytes_per_sequence * 2 == bf16.kv_bytes_per_sequence
    assert fp8.max_batch > bf16.max_batch


def test_format_plan_is_a_readable_table():
    text = format_plan(plan_memory(GPT_OSS_120B, 80 * GIB, 8192))
    for label in ("weights", "experts (MXFP4)", "KV per token", "ring buffer", "reserve", "largest static batch"):
        assert label in text
    assert "60.77 GiB" in text


@pytest.mark.parametrize(
    "text,expected",
    [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("80 gib", 80 * 2**30), ("512MiB", 512 * 2**20),
     ("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29), ("85899345920", 85899345920), (1024, 1024)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["80 gigs", "", "GiB", "-1GiB", "0GiB", "80GiBs", "1e9"])
def test_parse_bytes_names_the_flag(text):
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes(text)


def test_plan_rejects_nonsense():
    with pytest.raises(ValueError):
        plan_memory(ModelConfig(), 0, 8192)


def test_shared_prefix_is_stored_once_and_more_rows_fit():
    """The issue's labeling job on an H100: a 1,500-token shared prefix, a 300-token item, 500 generated."""
    per_layer_token = 2 * 8 * 64 * 2
    for ring in (False, True):
        plain = plan_memory(GPT_OSS_120B, 80 * 10**9, 2300, ring_buffer_windowed_layers=ring)
        shared = plan_memory(GPT_OSS_120B, 80 * 10**9, 2300, ring_buffer_windowed_layers=ring, shared_prefix_tokens=1500)
        assert shared.prefix_kv_bytes == 18 * per_layer_token * 1500 + 18 * per_layer_token * 127  # windowed: the window's tail
        own_windowed = 18 * per_layer_token * (128 if ring else 800)
        assert shared.kv_bytes_per_sequence == 18 * per_layer_token * 800 + own_windowed
        assert shared.max_batch_unshared == plain.max_batch
        assert shared.used_bytes <= shared.gpu_memory_bytes < shared.used_bytes + shared.bytes_per_sequence
    # ~90 MB per row without sharing, ~34 MB with: about 2.5x the rows (the 119 -> 310, less our workspace).
    assert shared.max_batch >= 2.4 * shared.max_batch_unshared
    text = format_plan(shared)
    assert "shared prefix of 1500 tokens, stored once" in text and "without prefix sharing" in text


def test_shared_prefix_is_checked():
    with pytest.raises(ValueError, match="--shared-prefix-tokens"):
        plan_memory(GPT_OSS_120B, 80 * GIB, 2048, shared_prefix_tokens=2048)


def test_plan_command_counts_a_shared_prefix(tiny_model_dir, capsys):
    from ossbatch.flows.cli import main

    assert main(["plan", "--model", str(tiny_model_dir), "--gpu-memory", "1GiB", "--max-context", "512",
                 "--shared-prefix-tokens", "400"]) == 0
    text = capsys.readouterr().out
    assert "shared prefix of 400 tokens, stored once" in text and "without prefix sharing" in text
    # A usage error: one line naming the flag, exit 2.
    assert main(["plan", "--model", str(tiny_model_dir), "--max-context", "512", "--shared-prefix-tokens", "512"]) == 2
    assert "--shared-prefix-tokens" in capsys.readouterr().err


def test_rows_by_context_for_gpt_oss_20b_on_a_16_gb_gpu():
    from ossbatch.engine.memory_plan import format_rows_by_context, rows_by_context

    gpu = parse_bytes("16GiB")
    rows = rows_by_context(GPT_OSS_20B, gpu, shared_prefix_tokens=1500)
    assert [context for context, _, _ in rows] == [2048, 4096, 8192, 16384, 32768, 65536, 131072]
    for context, by_position, ring in rows:
        # Each entry is the plan at that context, so its batch is the largest that fits there.
        assert by_position == plan_memory(GPT_OSS_20B, gpu, context, shared_prefix_tokens=1500)
        assert ring.max_batch >= by_position.max_batch  # windowed layers hold only their window
        assert by_position.max_batch >= by_position.max_batch_unshared  # the prefix's KV held once
    batches = [plan.max_batch for _, plan, _ in rows]
    assert batches == sorted(batches, reverse=True) and batches[0] > batches[-1] == 0
    at_4096 = rows[1][1]
    assert at_4096.max_batch > at_4096.max_batch_unshared >= 1
    text = format_rows_by_context(rows)
    assert "16.00 GiB" in text and "without sharing the 1500-token prefix" in text
    assert f"   4096  {at_4096.max_batch:>13}" in text


def test_rows_by_context_skips_contexts_the_prefix_fills():
    from ossbatch.engine.memory_plan import rows_by_context

    rows = rows_by_context(GPT_OSS_20B, parse_bytes("16GiB"), shared_prefix_tokens=5000)
    assert [context for context, _, _ in rows][0] == 8192


def test_host_budget_gives_the_expert_cache_what_the_batch_leaves():
    from ossbatch.engine.memory_plan import RUNTIME_GROWTH_BYTES, SCORING_LOGIT_ROWS, format_host_budget, plan_host_memory

    c = GPT_OSS_20B
    plan = plan_host_memory(c, 4 * GIB, GIB // 2, batch_tokens=4096, max_batch_rows=8, dtype_bytes=2, expert_cache_cap=8 * GIB)
    assert plan.kv_bytes == 4096 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    assert plan.logits_bytes == 2 * 8 * c.vocab_size * 4
    assert plan.runtime_bytes == RUNTIME_GROWTH_BYTES
    assert plan.expert_cache_bytes == 4 * GIB - GIB // 2 - plan.reserve_bytes > 0
    assert plan.shortfall_bytes == 0
    capped = plan_host_memory(c, 4 * GIB, GIB // 2, 4096, 8, 2, expert_cache_cap=GIB)
    assert capped.expert_cache_bytes == GIB
    # A larger batch leaves less; one that does not fit leaves nothing and says what to lower.
    wider = plan_host_memory(c, 4 * GIB, GIB // 2, 16384, 8, 2, 8 * GIB)
    assert wider.expert_cache_bytes < plan.expert_cache_bytes
    short = plan_host_memory(c, GIB, GIB // 2, 65536, 256, 2, 8 * GIB)
    assert short.expert_cache_bytes == 0 and short.shortfall_bytes > 0
    assert "--batch-tokens" in format_host_budget(short) and "--batch-tokens" not in format_host_budget(plan)
    # Scoring labels as rows finish reserves the contexts' copies (half the full layers' cache, each
    # row's window tail in the windowed ones) and a pass's logits.
    scoring = plan_host_memory(c, 4 * GIB, GIB // 2, 4096, 8, 2, 8 * GIB, label_scoring=True)
    per_layer_token = 2 * c.num_key_value_heads * c.head_dim * 2
    half = c.num_hidden_layers // 2  # gpt-oss alternates windowed and full layers
    assert scoring.scoring_bytes == (half * per_layer_token * 4096 // 2 + 8 * half * per_layer_token * (c.sliding_window - 1)
                                     + 2 * SCORING_LOGIT_ROWS * c.vocab_size * 4) and plan.scoring_bytes == 0
    assert scoring.expert_cache_bytes == plan.expert_cache_bytes - scoring.scoring_bytes
    assert "label scoring" in format_host_budget(scoring) and "label scoring" not in format_host_budget(plan)


def test_label_scoring_reserves_its_copies_and_logits():
    """Scoring labels as rows finish copies their contexts out of the KV cache (at most half its
    own tokens in full layers, the window's tail in windowed ones) and holds one pass's logits:
    the plan reserves both, so fewer rows fit, and the batch still fits exactly."""
    from ossbatch.engine.memory_plan import SCORING_LOGIT_ROWS

    c = GPT_OSS_20B
    plain = plan_memory(c, parse_bytes("16GiB"), 4096, shared_prefix_tokens=1500)
    scoring = plan_memory(c, parse_bytes("16GiB"), 4096, shared_prefix_tokens=1500, label_scoring=True)
    per_layer_token = 2 * c.num_key_value_heads * c.head_dim * 2
    assert scoring.scoring_bytes_per_sequence == (plain.full_layers * per_layer_token * (4096 - 1500) // 2
                                                  + plain.windowed_layers * per_layer_token * (c.sliding_window - 1))
    assert scoring.scoring_fixed_bytes == 2 * SCORING_LOGIT_ROWS * c.vocab_size * 4 and plain.scoring_fixed_bytes == 0
    assert 1 <= scoring.max_batch < plain.max_batch
    assert scoring.used_bytes <= scoring.gpu_memory_bytes < scoring.used_bytes + scoring.bytes_per_sequence
    assert "label scoring" in format_plan(scoring) and "label scoring" not in format_plan(plain)


def test_plan_command_reserves_label_scoring(tiny_model_dir, capsys):
    from ossbatch.flows.cli import main

    assert main(["plan", "--model", str(tiny_model_dir), "--gpu-memory", "1GiB", "--max-context", "512", "--label-scoring"]) == 0
    assert "label scoring: logits of one pass" in capsys.readouterr().out
