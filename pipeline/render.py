"""Render a request as a harmony prompt with openai-harmony.

System: `SystemContent.new()` with the reasoning effort and no conversation
date (so nightly runs render identically); developer: the instructions (and
a schema's response format); then the conversation, earlier assistant turns
on the `final` channel, then the assistant's turn.  Text that spells a
special token is encoded as text.
"""

from functools import lru_cache

from openai_harmony import DeveloperContent, Message, ReasoningEffort, Role, SystemContent

from ossbatch.pipeline.harmony import harmony_encoding

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
        elif role in _ROLES:
            turn = Message.from_role_and_content(_ROLES[role], content)
            turns.append(turn.with_channel("final") if role == "assistant" else turn)
        else:
            raise ValueError(f"messages[{index}].role must be system, developer, user or assistant, got {role!r}")
    if not any(m.author.role == Role.USER for m in turns):
        raise ValueError("messages has no user message")
    return "\n\n".join(developer_parts), turns


def _header(developer_text: str, reasoning_effort: str, response_format: str | None) -> list[Message]:
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    system = SystemContent.new().with_reasoning_effort(REASONING_EFFORTS[reasoning_effort])
    header = [Message.from_role_and_content(Role.SYSTEM, system)]
    if developer_text or response_format:
        developer = DeveloperContent.new().with_instructions("\n\n".join(filter(None, [developer_text, response_format])))
        header.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return header


@lru_cache(maxsize=256)
def _rendered_header(developer_text: str, reasoning_effort: str, response_format: str | None) -> tuple[int, ...]:
    encoding = harmony_encoding()
    return tuple(t for m in _header(developer_text, reasoning_effort, response_format) for t in encoding.render(m))


@lru_cache(maxsize=1)
def _completion_start() -> tuple[int, ...]:
    return tuple(harmony_encoding().encode("<|start|>assistant", allowed_special={"<|start|>"}))


def render_prompt(
    messages: list[dict],
    instructions: str | None = None,
    reasoning_effort: str = "medium",
    response_format: str | None = None,
) -> list[int]:
    """The prompt's token ids, ending with `<|start|>assistant`.

    Equal to harmony's `render_conversation_for_completion` (tested); the system and developer
    messages, the same for most rows of a job, are rendered once and reused: they are ~60% of the
    rendering time of a short row.
    """
    developer_text, turns = _turns(messages, instructions)
    encoding = harmony_encoding()
    tokens = list(_rendered_header(developer_text, reasoning_effort, response_format))
    for turn in turns:
        tokens += encoding.render(turn)
    return tokens + list(_completion_start())
