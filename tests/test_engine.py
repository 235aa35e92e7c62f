"""The engine's dtype choice (float32 where the CPU would only emulate bf16), where it runs, and
the text of traces sampled with log-probabilities (decoded here, not by vLLM)."""

from distill.models.tokens import load_tokenizer
from distill.rollout.engine import choice_max_tokens, cpu_has_bf16, engine_dtype, engine_inline, stream_text

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_bf16_is_read_from_the_flags():
    assert not cpu_has_bf16(AVX2)
    assert cpu_has_bf16(SAPPHIRE) and cpu_has_bf16(GRAVITON)
    assert not cpu_has_bf16("flags\t\t: avx2 bf16x\n")  # whole flags only


def test_auto_means_float32_only_on_a_cpu_without_bf16():
    assert engine_dtype("auto", cuda=False, cpuinfo=AVX2) == "float32"
    assert engine_dtype("auto", cuda=False, cpuinfo=SAPPHIRE) == "auto"
    assert engine_dtype("auto", cuda=True, cpuinfo=AVX2) == "auto"
    assert engine_dtype("bfloat16", cuda=False, cpuinfo=AVX2) == "bfloat16"  # an explicit choice stands


def test_a_choice_is_never_cut_short():
    # The grammar may spell a choice one byte a token: bytes, not characters, plus the end.
    assert choice_max_tokens(("high", "low")) == 5
    assert choice_max_tokens(("高", "低")) == 4


def test_the_engine_runs_inline_on_cpu_unless_told_otherwise():
    assert engine_inline("auto", cuda=False) and not engine_inline("auto", cuda=True)
    assert engine_inline("inline", cuda=True) and not engine_inline("separate", cuda=False)


def test_stream_text_decodes_as_vllm_streams(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    backend = tokenizer.backend_tokenizer
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    text = "<think>\nThe tone sits near 440 Hz, 音高 high.</think>\nhigh"
    ids = tokenizer.encode(text)
    assert stream_text(backend, prompt, ids, stop_terminated=False) == text
    # The stop token that ended the generation is not text (vLLM leaves it out too).
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stream_text(backend, prompt, [*ids, eos], stop_terminated=True) == text
    assert stream_text(backend, prompt, [*ids, eos], stop_terminated=False) == text + "<|im_end|>"
    # A trace cut inside a character: its first bytes are held back, as a stream holds them until
    # the character completes (a byte-level vocabulary spells 音 in several tokens).
    head = tokenizer.encode("pitch 音")
    assert len(tokenizer.encode("音")) > 1
    assert stream_text(backend, prompt, head[:-1], stop_terminated=False) == "pitch "
    assert tokenizer.decode(head[:-1]).endswith("\ufffd")


def test_an_engine_without_the_ban_processor_is_refused():
    from types import SimpleNamespace

    import pytest

    from distill.rollout.engine import BANNED_TOKENS_PROCESSOR, Sampling

    def engine(processors):
        return SimpleNamespace(
            llm_engine=SimpleNamespace(model_config=SimpleNamespace(logits_processors=processors))
        )

    banning = Sampling(1.0, 1.0, 8, banned=(5,))
    with pytest.raises(RuntimeError, match="cannot ban tokens"):
        banning.check_engine(engine(None))
    banning.check_engine(engine([BANNED_TOKENS_PROCESSOR]))
    Sampling(1.0, 1.0, 8).check_engine(engine(None))  # nothing banned: any engine will do


def test_audio_markup_is_banned_by_its_single_token_ids(tiny_model):
    from distill.models.tokens import audio_token_ids, audio_tokens

    tokenizer = load_tokenizer(str(tiny_model))
    ids = audio_token_ids(str(tiny_model))
    assert len(ids) == len(audio_tokens(str(tiny_model))) >= 3
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == audio_tokens(str(tiny_model))
