"""Label probabilities through the run stage on the tiny model: every allowed label spelled where
the answer names its label, scored given everything before it, normalised; against transformers'
GptOssForCausalLM (teacher-forced, float32) within 1e-3."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from pipeline_fakes import write_jsonl

from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.driver import job_spec, run_job
from ossbatch.pipeline.infer import ShardInferencer
from ossbatch.pipeline.label_probs import label_enum, spell_labels, value_span
from ossbatch.pipeline.logprobs import encode_text, token_bytes
from ossbatch.pipeline.parse import final_content_spans

transformers = pytest.importorskip("transformers")

# One-token labels, a multi-token one, and two sharing their first token(s).
LABELS = ["yes", "no", "maybe later", "maybe not", "positive", "positively not"]
SCHEMA = {"type": "object", "properties": {"verdict": {"enum": LABELS}, "why": {"type": "string", "maxLength": 5}},
          "required": ["verdict", "why"], "additionalProperties": False}


def test_the_labels_have_the_shapes_the_test_needs():
    tokens = {label: encode_text(json.dumps(label)) for label in LABELS}
    assert len(tokens["maybe later"]) > 2  # several tokens
    assert tokens["maybe later"][:2] == tokens["maybe not"][:2]  # sharing their first tokens
    assert tokens["positive"][0] == tokens["positively not"][0]


def test_value_span_finds_the_top_level_field():
    text = '{"why": "a,\\"b", "nested": {"verdict": 1}, "verdict" :  "maybe not" }'
    start, stop = value_span(text, "verdict")
    assert text[start:stop] == '"maybe not"'
    assert value_span('{"why": "x"}', "verdict") is None and value_span('{"verdict": "ye', "verdict") is None


@pytest.fixture(scope="module")
def labeled(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels")
    rows = [{"id": f"r{i}", "prompt": f"Is it {word}? Answer.", "schema": SCHEMA}
            for i, word in enumerate(["good", "bad", "fine", "odd", "late", "sunny"])]
    inputs = write_jsonl(tmp / "in.jsonl", rows)
    job = Job(model=str(tiny_model_dir), inputs=[inputs], output=str(tmp / "out"),
              options=JobOptions(max_tokens=60, temperature=1.0, max_reasoning_tokens=4, keep_token_ids=True,
                                 logprobs=True, label_field="verdict"))
    run_job(job_spec(job), ShardInferencer(job))
    return {r["id"]: r for r in pq.read_table(tmp / "out" / "data").to_pylist()}


def test_label_probs_equal_transformers(labeled, tiny_model_dir):
    hf = transformers.GptOssForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    scored = 0
    for row in labeled.values():
        if row["status"] != "ok":
            continue
        probs = dict(row["label_probs"])
        assert list(probs) == LABELS and sum(probs.values()) == pytest.approx(1.0)
        chosen = json.loads(row["output_json"])["verdict"]
        assert row["label_confidence"] == pytest.approx(probs[chosen])
        spelling = spell_labels(row["prompt_token_ids"], row["output_token_ids"], final_content_spans(row["output_token_ids"]), "verdict", LABELS)
        expected = []
        for candidate in spelling.candidates:
            with torch.no_grad():
                logits = hf(torch.tensor([spelling.context + candidate])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(spelling.context) - 1 : -1], -1)
            expected.append(float(logprobs[torch.arange(len(candidate)), torch.tensor(candidate)].sum()))
        reference = torch.softmax(torch.tensor(expected, dtype=torch.float64), 0).tolist()
        assert [probs[label] for label in LABELS] == pytest.approx(reference, abs=1e-3)
        scored += 1
    assert scored >= 3


def test_refilled_slots_and_no_sharing_give_the_same_label_probs(labeled, tiny_model_dir, tmp_path):
    """Two KV slots for six rows (finished rows hold their slot until scored, then it is refilled),
    and the same rows without prefix sharing: every row's tokens and label_probs are the same."""
    rows = [{"id": f"r{i}", "prompt": f"Is it {word}? Answer.", "schema": SCHEMA}
            for i, word in enumerate(["good", "bad", "fine", "odd", "late", "sunny"])]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    for name, options in (("two-slots", dict(max_batch_rows=2)), ("unshared", dict(prefix_sharing=False))):
        job = Job(model=str(tiny_model_dir), inputs=[inputs], output=str(tmp_path / name),
                  options=JobOptions(max_tokens=60, temperature=1.0, max_reasoning_tokens=4, keep_token_ids=True,
                                     logprobs=True, label_field="verdict", **options))
        run_job(job_spec(job), ShardInferencer(job))
        again = {r["id"]: r for r in pq.read_table(tmp_path / name / "data").to_pylist()}
        assert sum(r["label_probs"] is not None for r in again.values()) >= 3, name
        for row_id, row in labeled.items():
            assert again[row_id]["output_token_ids"] == row["output_token_ids"], (name, row_id)
            if row["label_probs"] is None:
                assert again[row_id]["label_probs"] is None, (name, row_id)
                continue
            got, expected = dict(again[row_id]["label_probs"]), dict(row["label_probs"])
            assert [got[k] for k in LABELS] == pytest.approx([expected[k] for k in LABELS], abs=1e-5), (name, row_id)


def test_the_answers_own_label_is_spelled_as_generated(labeled):
    """Each label is spelled from the last token boundary before the value to the first after it;
    the context is the prompt and everything generated before that boundary."""
    for row in labeled.values():
        if row["status"] != "ok":
            continue
        tokens = row["output_token_ids"]
        spelling = spell_labels(row["prompt_token_ids"], tokens, final_content_spans(tokens), "verdict", LABELS)
        (begin, end), = final_content_spans(tokens)
        cut = len(spelling.context) - len(row["prompt_token_ids"])
        assert spelling.context == row["prompt_token_ids"] + tokens[:cut] and begin <= cut < end
        text = b"".join(token_bytes(t) for t in tokens[cut:end]).decode()
        for label, candidate in zip(LABELS, spelling.candidates):
            written = b"".join(token_bytes(t) for t in candidate).decode()
            lead, _, tail = written.partition(json.dumps(label))
            assert tail and text.startswith(lead) and not lead.strip(' \t\r\n:"') and not tail.strip('"')[1:].strip(" \t\r\n,}")


@pytest.mark.parametrize("constrained", [False, True], ids=["final", "final-constrain-json"])
def test_canonical_answer_tokens_are_the_chosen_labels_candidate(constrained):
    """Where the answer is written in the canonical tokens, the chosen label's candidate is exactly
    the answer's own tokens after the cut (so its score is the sampled tokens' logprobs), under the
    final header the grammar forces and under harmony's constrained one alike."""
    from ossbatch.pipeline.harmony import CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START

    answer = encode_text('{"verdict":"maybe not","why":"x"}')  # '{"', 'verd', 'ict', '":"', ...
    content_type = [*encode_text(" "), CONSTRAIN, *encode_text("json")] if constrained else []
    header = [START, *encode_text("assistant"), CHANNEL, *encode_text("final"), *content_type, MESSAGE]
    tokens = [CHANNEL, *encode_text("analysis"), MESSAGE, *encode_text("hmm"), END, *header, *answer, RETURN]
    spelling = spell_labels([1, 2], tokens, final_content_spans(tokens), "verdict", LABELS)
    start = len(tokens) - 1 - len(answer)
    cut = len(spelling.context) - 2
    chosen = spelling.candidates[LABELS.index("maybe not")]
    assert spelling.chosen == "maybe not" and tokens[cut:cut + len(chosen)] == chosen
    # '":"' starts every spelling and is the answer's own: the engine scores the labels after it
    scored = spelling.continuations()
    assert spelling.shared == 1 and scored.after == cut + 1 and scored.candidates == [c[1:] for c in spelling.candidates]
    assert b"".join(token_bytes(t) for t in tokens[start:cut]) == b'{"verdict'
    spelled = b"".join(token_bytes(t) for t in chosen).decode()
    assert spelled.startswith('":"maybe not",')  # to the token boundary after the value
    assert spelling.candidates[LABELS.index("yes")] == encode_text(spelled.replace("maybe not", "yes"))


def test_rows_without_a_label_enum_get_no_probs(tiny_model_dir, tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "free", "prompt": "hi"},
                                                 {"id": "other", "prompt": "hi", "schema": {"type": "object"}}])
    job = Job(model=str(tiny_model_dir), inputs=[inputs], output=str(tmp_path / "out"),
              options=JobOptions(max_tokens=30, label_field="verdict", max_reasoning_tokens=2))
    run_job(job_spec(job), ShardInferencer(job))
    for row in pq.read_table(tmp_path / "out" / "data").to_pylist():
        assert row["label_probs"] is None and row["label_confidence"] is None
    assert label_enum(json.dumps(SCHEMA), "verdict") == LABELS and label_enum(json.dumps(SCHEMA), "why") is None
