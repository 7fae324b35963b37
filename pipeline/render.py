"""Render a request as a harmony prompt with openai-harmony.

System: `SystemContent.new()` with the reasoning effort and no conversation
date (so nightly runs render identically); developer: the instructions (and
a schema's response format) and the function tools, as harmony's own tool
descriptions; then the conversation, earlier assistant turns on the `final`
channel, then the assistant's turn.  Text that spells a special token is
encoded as text.

Function calling as harmony renders it: an earlier assistant turn's tool calls
are assistant messages on the `commentary` channel to `functions.NAME` with
content type `<|constrain|>json` (text the turn had besides its calls goes
before them, on `commentary`, as gpt-oss's preambles do); a tool result is a
message from `functions.NAME` to the assistant on `commentary`.
"""

import json
from functools import lru_cache

from openai_harmony import (
    Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent, ToolDescription,
)

from ossbatch.pipeline.harmony import harmony_encoding
from ossbatch.pipeline.tools import FUNCTIONS, JSON_CONTENT_TYPE, tool_descriptions

REASONING_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
_ROLES = {"user": Role.USER, "assistant": Role.ASSISTANT}
_INSTRUCTION_ROLES = ("system", "developer")


def stop_token_ids() -> list[int]:
    """<|return|> and <|call|>: the tokens that end an assistant's turn."""
    return list(harmony_encoding().stop_tokens_for_assistant_actions())


def _turns(messages: list[dict], instructions: str | None) -> tuple[str, list[Message]]:
    """The developer text (instructions, then system/developer messages) and the conversation turns."""
    developer_parts = [instructions] if instructions else []
    turns = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string")
        if role in _INSTRUCTION_ROLES:
            developer_parts.append(content)
        elif role == "assistant" and message.get("tool_calls"):
            turns += _call_turns(content, message["tool_calls"])
        elif role == "tool" and isinstance(message.get("name"), str):
            author = Author.new(Role.TOOL, f"{FUNCTIONS}.{message['name']}")
            turns.append(Message.from_author_and_content(author, content).with_channel("commentary").with_recipient("assistant"))
        elif role in _ROLES:
            turn = Message.from_role_and_content(_ROLES[role], content)
            turns.append(turn.with_channel("final") if role == "assistant" else turn)
        elif role == "tool":
            raise ValueError(f"messages[{index}]: a tool message needs the name of the function whose call it answers")
        else:
            raise ValueError(f"messages[{index}].role must be system, developer, user, assistant or tool, got {role!r}")
    if not any(m.author.role == Role.USER for m in turns):
        raise ValueError("messages has no user message")
    return "\n\n".join(developer_parts), turns


def _call_turns(content: str, tool_calls: list[dict]) -> list[Message]:
    """An assistant turn's text (a preamble, on commentary) and each of its calls."""
    turns = [Message.from_role_and_content(Role.ASSISTANT, content).with_channel("commentary")] if content else []
    for call in tool_calls:
        turns.append(Message.from_role_and_content(Role.ASSISTANT, call["arguments"]).with_channel("commentary")
                     .with_recipient(f"{FUNCTIONS}.{call['name']}").with_content_type(JSON_CONTENT_TYPE))
    return turns


def _header(developer_text: str, reasoning_effort: str, response_format: str | None,
            tools: str | None = None) -> list[Message]:
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    system = SystemContent.new().with_reasoning_effort(REASONING_EFFORTS[reasoning_effort])
    header = [Message.from_role_and_content(Role.SYSTEM, system)]
    instructions = "\n\n".join(filter(None, [developer_text, response_format]))
    if instructions or tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if tools:
            developer = developer.with_function_tools([
                ToolDescription.new(name, description, json.loads(parameters) if parameters else None)
                for name, description, parameters in json.loads(tools)])
        header.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return header


@lru_cache(maxsize=256)
def _rendered_header(developer_text: str, reasoning_effort: str, response_format: str | None,
                     tools: str | None = None) -> tuple[int, ...]:
    # As a conversation: harmony then tells the system message that function calls go to commentary.
    conversation = Conversation.from_messages(_header(developer_text, reasoning_effort, response_format, tools))
    return tuple(harmony_encoding().render_conversation(conversation))


@lru_cache(maxsize=1)
def _completion_start() -> tuple[int, ...]:
    return tuple(harmony_encoding().encode("<|start|>assistant", allowed_special={"<|start|>"}))


def render_prompt(
    messages: list[dict],
    instructions: str | None = None,
    reasoning_effort: str = "medium",
    response_format: str | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """The prompt's token ids, ending with `<|start|>assistant`.

    Equal to harmony's `render_conversation_for_completion` (tested); the system and developer
    messages, the same for most rows of a job, are rendered once and reused: they are ~60% of the
    rendering time of a short row. ``tools`` are the request's function tools ({name, description,
    parameters (JSON Schema text or None)}).
    """
    developer_text, turns = _turns(messages, instructions)
    encoding = harmony_encoding()
    tokens = list(_rendered_header(developer_text, reasoning_effort, response_format, tool_descriptions(tools)))
    for turn in turns:
        tokens += encoding.render(turn)
    return tokens + list(_completion_start())
