"""A model directory's tokenizer and the tokens every stage must know: the family's audio
placeholders, the special tokens no trace may hold, and `</think>`."""

from __future__ import annotations

from functools import lru_cache

from distill.core.prompts import THINK_CLOSE
from distill.models.registry import family_of


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def control_tokens(model_dir: str) -> tuple[str, ...]:
    """The tokenizer's special tokens (chat turns, audio placeholders), which no trace may contain."""
    tokenizer = load_tokenizer(model_dir)
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return tuple(sorted(special | set(audio_tokens(model_dir))))


@lru_cache(maxsize=8)
def audio_tokens(model_dir: str) -> list[str]:
    """The tokens that mark audio input (the model family's audio placeholders and markup): a
    trace that generates one would be read as a slot for audio by every later stage."""
    return sorted(family_of(model_dir).markup_tokens(load_tokenizer(model_dir)))


@lru_cache(maxsize=8)
def audio_token_ids(model_dir: str) -> tuple[int, ...]:
    """The ids of `audio_tokens`, which the engine bans by id: each must be one token (the
    families' markup are added tokens), else banning its id would not ban the word."""
    tokenizer = load_tokenizer(model_dir)
    ids = []
    for token in audio_tokens(model_dir):
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(
                f"{model_dir}: the audio markup {token!r} is {len(encoded)} tokens, not one "
                "(the model family's markup_tokens must name the tokenizer's added tokens)"
            )
        ids.append(encoded[0])
    return tuple(ids)


def think_close_token_id(tokenizer) -> int | None:
    """The id of `</think>` when the tokenizer has it as one token (Qwen-family models do), else None."""
    ids = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None
