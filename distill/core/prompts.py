"""Prompts: one place that turns an item into the chat text the model sees, for every stage.

Sampling, training and eval must render the same prompt, or the student is trained on a format
it is never sampled with.
"""

from __future__ import annotations

from collections.abc import Callable

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def reasoning_split(token_ids, think_close_id: int | None) -> int:
    """Where audio dependence splits a completion's tokens into reasoning and answer: after the
    last `</think>` token, or at the end without one (grounding/scoring.py). Not the reasoning's
    length (`reasoning_tokens`), which counts the tokens before the first `</think>`."""
    ids = list(token_ids)
    return len(ids) - ids[::-1].index(think_close_id) if think_close_id in ids else len(ids)


def reasoning_tokens(
    recorded: int | None, text: str, count: Callable[[str], int] | None = None
) -> int | None:
    """The reasoning's length in tokens, before the first `</think>`: as the engine counted it
    (`recorded`), else counted from the text by `count` (a tokenizer's), else estimated at about four
    characters a token (a trace written without the count, where no tokenizer is at hand); None
    when the reasoning was never closed."""
    if recorded is not None:
        return recorded
    end = text.find(THINK_CLOSE)
    if end < 0:
        return None
    return count(text[:end]) if count is not None else max(1, end // 4)


def chat_prompt(tokenizer, question: str, system_prompt: str, audio_items: int = 1) -> str:
    """The rendered chat up to the assistant turn (the model's own chat template): the audio
    items (chunks of one recording, in order), then the question."""
    audio = [{"type": "audio", "audio": f"chunk {i}"} for i in range(audio_items)]
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": [*audio, {"type": "text", "text": question}]},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def question_text(question: str, choices: list[str] | None) -> str:
    """The question as asked, with the options listed when it is multiple choice."""
    if not choices:
        return question
    return f"{question}\nOptions: {', '.join(choices)}."


def item_prompt(tokenizer, item, system_prompt: str, audio_items: int = 1) -> str:
    """The chat prompt for a data_pipelines Item, without the generation prefix."""
    return chat_prompt(tokenizer, question_text(item.question, item.choices), system_prompt, audio_items)


def split_trace(text: str, tags_unique: bool = False) -> tuple[str, str] | None:
    """(reasoning, answer) of a trace that is exactly `<think>reasoning</think>answer`, else None.

    `tags_unique`: the caller knows the text holds no other tag (it has exactly two '<'), which
    spares the two scans of the whole text that prove it.
    """
    start = len(text) - len(text.lstrip())
    close = text.rfind(THINK_CLOSE)
    if not text.startswith(THINK_OPEN, start) or close < start:
        return None
    if not tags_unique and (text.count(THINK_OPEN, start) != 1 or text.count(THINK_CLOSE, start) != 1):
        return None
    return text[start + len(THINK_OPEN) : close].strip(), text[close + len(THINK_CLOSE) :].strip()
