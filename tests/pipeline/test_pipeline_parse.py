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
