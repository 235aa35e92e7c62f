"""A byte-level BPE tokenizer trained here, for tiny models: nothing can be downloaded at run time."""

from __future__ import annotations

# Added as ordinary (non-special) tokens so that decoding with skip_special_tokens keeps them.
THINK_TOKENS = ["<think>", "</think>"]


def tiny_corpus() -> list[str]:
    """Texts the tiny tokenizers learn from: the synthetic tasks and the chat scaffolding."""
    from data_pipelines.synthetic import corpus

    return corpus() + [
        "You are a helpful assistant.",
        "You are a helpful assistant that listens carefully and reasons about sounds.",
        "system",
        "user",
        "assistant",
        "Audio 1: ",
    ]


def train_tokenizer(
    vocab_size: int,
    special_tokens: list[str],
    chat_template: str,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    extra_special_tokens: dict[str, str] | None = None,
):
    """A PreTrainedTokenizerFast over tiny_corpus() with the family's special tokens (ids from 0
    in the given order), the think tags as ordinary added tokens, and the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    kwargs = {"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        chat_template=chat_template,
        model_max_length=32768,
        **kwargs,
    )
