"""ossbatch.pipeline.parse: harmony completions parsed into reasoning and answer."""

import pytest
from openai_harmony import Conversation, Message, Role

from ossbatch.pipeline.harmony import CHANNEL, CONSTRAIN, RETURN, START, harmony_encoding
from ossbatch.pipeline.parse import final_content_spans, parse_completion


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


@pytest.mark.parametrize("header", ["<|channel|>final<|message|>", "<|channel|>final <|constrain|>json<|message|>"],
                         ids=["final", "final-constrain-json"])
def test_truncated_final_answer_is_the_answer_so_far(header):
    """Cut off mid-answer, under the plain final header or harmony's constrained one: the answer so far."""
    head = _completion("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant")
    tail = _completion(header + '{"verd')
    parsed = parse_completion(head + tail, "length")
    assert (parsed.status, parsed.output_text, parsed.reasoning_text) == ("length", '{"verd', "Hmm.")
    assert (parsed.reasoning_tokens, parsed.output_tokens) == (len(head), len(tail))
    assert parsed.answer_spans == [(len(tokens := head + tail) - len(_completion('{"verd')), len(tokens))]


def _rendered_completion(answer: str, content_type: str | None) -> list[int]:
    """A reasoning message, then a final answer, as harmony's own renderer writes them, less the
    prompt's ``<|start|>assistant`` (a constrained answer's header: ``final <|constrain|>json``)."""
    enc = harmony_encoding()
    reasoning = Message.from_role_and_content(Role.ASSISTANT, "Think it over.").with_channel("analysis")
    final = Message.from_role_and_content(Role.ASSISTANT, answer).with_channel("final")
    if content_type is not None:
        final = final.with_content_type(content_type)
    tokens = enc.render(reasoning) + enc.render_conversation_for_training(Conversation.from_messages([final]))
    assert tokens[:2] == [START, *enc.encode("assistant")] and tokens[-1] == RETURN
    return tokens[2:]


def test_constrained_final_header_is_the_answer_with_its_tokens():
    """harmony renders a JSON answer's header ``<|channel|>final <|constrain|>json``: the message is
    the final answer (harmony's parser alone reads ``<|constrain|>json`` as a recipient)."""
    answer = '{"verdict":"yes","why":"it says so"}'
    tokens = _rendered_completion(answer, "<|constrain|>json")
    assert CONSTRAIN in tokens
    parsed = parse_completion(tokens, "stop")
    assert (parsed.status, parsed.finish_reason, parsed.error) == ("ok", "stop", None)
    assert (parsed.output_text, parsed.reasoning_text, parsed.tool_calls) == (answer, "Think it over.", None)
    answer_tokens = harmony_encoding().encode(answer)
    stop = len(tokens) - 1  # before <|return|>
    assert parsed.answer_spans == [(stop - len(answer_tokens), stop)]
    assert tokens[stop - len(answer_tokens):stop] == answer_tokens
    final_header = len(tokens) - 1 - tokens[::-1].index(CHANNEL)  # the answer's <|channel|>
    assert (parsed.reasoning_tokens, parsed.output_tokens) == (final_header, len(tokens) - final_header)
    assert final_content_spans(tokens) == parsed.answer_spans


def test_constrained_and_plain_final_headers_parse_alike():
    """Only the header's length differs: the plain header's parse is the constrained one's, its
    answer span and output count shorter by ``␣<|constrain|>json``."""
    answer = '{"verdict":"no"}'
    constrained = parse_completion(_rendered_completion(answer, "<|constrain|>json"), "stop")
    plain_tokens = _rendered_completion(answer, None)
    assert CONSTRAIN not in plain_tokens
    plain = parse_completion(plain_tokens, "stop")
    shift = len(harmony_encoding().encode(" <|constrain|>json", allowed_special="all"))
    assert shift == 3
    assert (plain.status, plain.output_text, plain.reasoning_text, plain.tool_calls, plain.finish_reason) == (
        constrained.status, constrained.output_text, constrained.reasoning_text, constrained.tool_calls, constrained.finish_reason)
    assert plain.answer_spans == [(start - shift, stop - shift) for start, stop in constrained.answer_spans]
    assert (plain.reasoning_tokens, plain.output_tokens) == (constrained.reasoning_tokens, constrained.output_tokens - shift)


def test_constrained_call_header_is_still_a_call():
    """``<|constrain|>json`` after a ``to=functions.NAME`` recipient stays that call's content type."""
    head = _completion("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant")
    call = _completion('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>')
    parsed = parse_completion(head + call, "stop", frozenset({"get_weather"}))
    assert (parsed.status, parsed.finish_reason, parsed.output_text) == ("ok", "tool_calls", None)
    assert parsed.tool_calls == [{"name": "get_weather", "arguments": '{"city":"Oslo"}'}]
    assert parsed.answer_spans == [] and parsed.output_tokens == len(call)
