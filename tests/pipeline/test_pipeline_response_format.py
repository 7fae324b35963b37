"""ossbatch.pipeline.response_format: the harmony `# Response Formats` section for a row's schema."""

import json

import pytest
from openai_harmony import Conversation, DeveloperContent, Message, Role, SystemContent

from ossbatch.pipeline.harmony import harmony_encoding
from ossbatch.pipeline.response_format import SchemaRefused, response_format_section

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
}
LABEL = json.dumps(LABEL_SCHEMA)


def test_response_format_section_layout():
    text = json.dumps(LABEL_SCHEMA, indent=2)
    section = response_format_section(text, "sentiment")
    assert section == ("# Response Formats\n\n## sentiment\n\n"
                       '{"type":"object","properties":{"label":{"enum":["positive","negative","neutral"]}},'
                       '"required":["label"],"additionalProperties":false}')
    assert response_format_section(text).startswith("# Response Formats\n\n## response\n\n{")


def test_response_format_section_description_comment():
    schema = {"description": "The sentiment\nof the review", "enum": ["a", "b"]}
    section = response_format_section(json.dumps(schema), "label")
    assert section.splitlines()[4] == "// The sentiment of the review"
    assert json.loads(section.splitlines()[5]) == schema


def test_response_format_section_renders_in_developer_message():
    enc = harmony_encoding()
    section = response_format_section(LABEL, "sentiment")
    dev = DeveloperContent.new().with_instructions("Label the review.\n\n" + section)
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.DEVELOPER, dev),
        Message.from_role_and_content(Role.USER, "Great product!"),
    ])
    tokens = enc.render_conversation_for_completion(convo, Role.ASSISTANT)
    rendered = enc.decode(tokens)
    assert "<|start|>developer<|message|># Instructions\n\nLabel the review.\n\n# Response Formats\n\n## sentiment\n\n{" in rendered
    assert rendered.endswith("<|start|>assistant")


def test_response_format_section_refuses_non_json():
    with pytest.raises(SchemaRefused, match="not valid JSON"):
        response_format_section("{nope")
