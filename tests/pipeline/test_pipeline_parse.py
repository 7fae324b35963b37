"""ossbatch.pipeline.parse: harmony completions parsed into reasoning and answer."""

from ossbatch.pipeline.harmony import harmony_encoding
from ossbatch.pipeline.parse import parse_completion


def _completion(text: str) -> list[int]:
    return harmony_encoding().encode(text, allowed_special="all")


def test_completion_parses_into_reasoning_and_answer_with_token_split():
    tokens = _completion("<|channel|>analysis<|message|>Think it over.<|end|><|start|>assistant<|channel|>final<|message|>Positive<|return|>")
    parsed = parse_completion(tokens, "stop")
    assert (parsed.status, parsed.reasoning_text, parsed.output_text) == ("ok", "Think it over.", "Positive")
    assert parsed.reasoning_tokens + parsed.output_tokens == len(tokens)
    assert parsed.output_tokens == len(_completion("<|channel|>final<|message|>Positive<|return|>"))


def test_truncated_completion_keeps_its_reasoning_and_says_length():
    tokens = _completion("<|channel|>analysis<|message|>Still thinking about")
    parsed = parse_completion(tokens, "length")
    assert (parsed.status, parsed.finish_reason, parsed.output_text) == ("length", "length", None)
    assert parsed.reasoning_text == "Still thinking about"


def test_unparseable_completion_is_an_error_with_the_parsers_message():
    parsed = parse_completion([1000, 2000, 200002], "stop")
    assert parsed.status == "error" and "does not parse as harmony" in parsed.error
    assert parsed.reasoning_tokens == 3


def test_completion_cut_inside_a_header_is_length_not_error():
    parsed = parse_completion(_completion("<|channel|>analysis<|message|>ok<|end|><|start|>assistant<|channel|>fin"), "length")
    assert (parsed.status, parsed.finish_reason) == ("length", "length")
    assert "truncated" in parsed.error


def test_counts_follow_harmonys_parse_when_a_header_is_spelled_in_several_tokens():
    """`final` as `f` + `inal`: harmony still parses a final message, and the counts say so."""
    enc = harmony_encoding()
    reasoning = _completion("<|channel|>analysis<|message|>Think it over.<|end|><|start|>assistant")
    answer = _completion("<|channel|>") + enc.encode("f") + enc.encode("inal") + _completion("<|message|>Positive<|return|>")
    assert len(answer) == len(_completion("<|channel|>final<|message|>Positive<|return|>")) + 1
    parsed = parse_completion(reasoning + answer, "stop")
    assert (parsed.status, parsed.reasoning_text, parsed.output_text) == ("ok", "Think it over.", "Positive")
    assert (parsed.reasoning_tokens, parsed.output_tokens) == (len(reasoning), len(answer))


def test_truncated_final_answer_counts_as_output():
    head = _completion("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant")
    tail = _completion("<|channel|>final<|message|>Posi")
    parsed = parse_completion(head + tail, "length")
    assert (parsed.status, parsed.output_text, parsed.reasoning_text) == ("length", "Posi", "Hmm.")
    assert (parsed.reasoning_tokens, parsed.output_tokens) == (len(head), len(tail))
