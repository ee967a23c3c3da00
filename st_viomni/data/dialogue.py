"""How a multi-turn visual dialogue becomes ``vqa_multi`` samples: one sample per answered turn.

``format_input`` takes one text per input, so the dialogue before the current question is rendered into that
text by one fixed rule, :func:`render_dialogue`: every earlier turn as a ``Q:`` line and an ``A:`` line, then
the current question as a last ``Q:`` line, joined by newlines. The first turn therefore renders as
``"Q: <question>"``. The anchor of turn *k* holds all the conversation's images and this text; its positive
is the answer of turn *k*. Encode a dialogue for search the same way:
``format_input("vqa_multi", render_dialogue(history, question), images)``.

Example:
    ::

        from st_viomni.data import render_dialogue

        render_dialogue([("How many shapes are there?", "There are two shapes.")], "What colour is the circle?")
        # 'Q: How many shapes are there?\\nA: There are two shapes.\\nQ: What colour is the circle?'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .schema import BAD_CONVERSATION, EMPTY_TEXT, RowProblem, check_text

QUESTION_LABEL = "Q: "
ANSWER_LABEL = "A: "

_QUESTION_ROLES = frozenset({"user", "human", "question", "q"})
_ANSWER_ROLES = frozenset({"assistant", "gpt", "bot", "model", "answer", "a"})
_IGNORED_ROLES = frozenset({"system"})


def render_dialogue(history: Sequence[tuple[str, str]], question: str) -> str:
    """Render earlier ``(question, answer)`` turns and the current question as one text (see module doc)."""
    lines = []
    for earlier_question, answer in history:
        lines.append(QUESTION_LABEL + earlier_question)
        lines.append(ANSWER_LABEL + answer)
    lines.append(QUESTION_LABEL + question)
    return "\n".join(lines)


def expand_turns(
    turns: Sequence[tuple[str, str]], *, max_history_turns: int | None = None
) -> list[tuple[str, str]]:
    """One ``(anchor_text, answer)`` pair per turn of a dialogue of ``(question, answer)`` turns.

    Args:
        turns: The dialogue's turns, in order.
        max_history_turns: Keep at most this many earlier turns in each anchor (the most recent ones), so that
            long dialogues do not outgrow the model's sequence length; None keeps them all.
    """
    pairs = []
    for index, (question, answer) in enumerate(turns):
        start = 0 if max_history_turns is None else max(0, index - max_history_turns)
        pairs.append((render_dialogue(turns[start:index], question), answer))
    return pairs


def parse_conversation(
    conversation: Any, column: str, *, image_placeholder: str | None = "<image>"
) -> list[tuple[str, str]]:
    """Read a conversation in one of the common layouts as a list of ``(question, answer)`` turns.

    Accepted layouts: a list of messages ``{"role": "user"|"assistant", "content": ...}`` (OpenAI / chat
    template style, content a string or a list of ``{"type": "text", "text": ...}`` items), ``{"from":
    "human"|"gpt", "value": ...}`` (LLaVA / ShareGPT style), or a flat list of strings alternating question
    and answer. System messages are ignored. Every question must be followed by its answer.

    Args:
        conversation: The conversation.
        column: Column name for error messages.
        image_placeholder: A marker to remove from the texts (LLaVA writes ``<image>`` where the image goes;
            here the images are given separately). None keeps texts as they are.

    Raises:
        RowProblem: not a list, no turns, roles out of order, an unanswered question, or an empty text.
    """
    if conversation is None or isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise RowProblem(column, BAD_CONVERSATION, f"expected a list of messages, got {type(conversation).__name__}")
    messages = [_message(item, column, position) for position, item in enumerate(conversation)]
    messages = [(role, text) for role, text in messages if role not in _IGNORED_ROLES]
    if not messages:
        raise RowProblem(column, BAD_CONVERSATION, "the conversation has no turns")
    turns = []
    for position in range(0, len(messages), 2):
        role, question = messages[position]
        if role != "question":
            raise RowProblem(column, BAD_CONVERSATION, f"message {position} should be a question, got an answer")
        if position + 1 >= len(messages):
            raise RowProblem(column, BAD_CONVERSATION, f"the question in message {position} has no answer")
        role, answer = messages[position + 1]
        if role != "answer":
            raise RowProblem(column, BAD_CONVERSATION, f"message {position + 1} should be an answer, got a question")
        question = _clean(question, image_placeholder)
        answer = _clean(answer, image_placeholder)
        turn_name = f"{column}[{position // 2}]"
        if isinstance(question, str) and not question.strip():
            raise RowProblem(turn_name, EMPTY_TEXT, "the question is empty")
        if isinstance(answer, str) and not answer.strip():
            raise RowProblem(turn_name, EMPTY_TEXT, "the answer is empty")
        turns.append((check_text(question, turn_name), check_text(answer, turn_name)))
    return turns


def _message(item: Any, column: str, position: int) -> tuple[str, Any]:
    if isinstance(item, str):
        # Flat list: even positions are questions, odd positions answers.
        return ("question" if position % 2 == 0 else "answer"), item
    if not isinstance(item, Mapping):
        raise RowProblem(column, BAD_CONVERSATION, f"message {position} is a {type(item).__name__}, not a dict")
    role = item.get("role", item.get("from"))
    role = role.lower() if isinstance(role, str) else role
    if role in _QUESTION_ROLES:
        role = "question"
    elif role in _ANSWER_ROLES:
        role = "answer"
    elif role not in _IGNORED_ROLES:
        raise RowProblem(column, BAD_CONVERSATION, f"message {position} has unknown role {role!r}")
    content = next((item[key] for key in ("content", "value", "text") if key in item), None)
    if isinstance(content, list):
        # Chat-template content: keep the text items, the images come from the images column.
        content = " ".join(
            part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return role, content


def _clean(text: Any, image_placeholder: str | None) -> Any:
    if isinstance(text, str) and image_placeholder:
        text = text.replace(image_placeholder, "").strip()
    return text
