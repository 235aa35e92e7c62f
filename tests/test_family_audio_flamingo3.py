"""The Audio Flamingo 3 family (distill/models/audio_flamingo3.py) on a tiny random AF3: its
training forward is the model's own, packing changes nothing, its checkpoint round-trips and
vLLM serves it with the same log-probabilities."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from distill.models.audio_flamingo3 import AudioFlamingo3
from distill.models.config import TinyModelConfig
from tests.serving import greedy_token_count, logprob_gap, offline_engine

FAMILY = AudioFlamingo3()
SYSTEM = "You are a helpful assistant that listens carefully and reasons about sounds."
QUESTION = "What is the sound?"
COMPLETION = "<think>\nnear 900 Hz\n</think>\nhigh<|im_end|>\n"
# What nvidia/audio-flamingo-3-hf's chat template renders for these messages (the form pinned by
# transformers' tests/models/audioflamingo3/test_processing_audioflamingo3.py::test_chat_template).
PUBLISHED_PROMPT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<sound>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": QUESTION}]},
]


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# One window, and two (the second 5 s): AF3 windows long audio, one item per prompt.
CLIPS = [clip(1.0, 0), clip(35.0, 1)]


@pytest.fixture(scope="module")
def tiny_af3(tmp_path_factory):
    out = tmp_path_factory.mktemp("af3") / "tiny"
    FAMILY.build_tiny(out, TinyModelConfig())
    return out


@pytest.fixture(scope="module")
def processor(tiny_af3):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_af3)


@pytest.fixture(scope="module")
def reference(tiny_af3):
    return FAMILY.reference_model(tiny_af3)


def prompt_text(processor) -> str:
    return processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) + COMPLETION


def reference_logits(model, processor, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, logits) of the model's own forward on the processor's output."""
    enc = processor(text=prompt_text(processor), audio=[audio], return_tensors="pt")
    with torch.no_grad():
        return enc["input_ids"][0], model(**enc).logits[0]


def family_logits(
    model, ids: torch.Tensor, encoded: list[torch.Tensor], positions: torch.Tensor
) -> torch.Tensor:
    """Logits of one row through the family's methods, as distill's training forward runs them
    (no attention mask: packed samples are told apart by their positions restarting at 0)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[None])
        slots = (ids == model.config.audio_token_id)[None, :, None]
        embeds = embeds.masked_scatter(slots, FAMILY.project(model, torch.cat(encoded)))
        position_ids = FAMILY.position_ids(positions[None])
        hidden = FAMILY.decoder(model)(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return FAMILY.lm_head(model)(hidden)[0]


def encoded_clips(model, processor) -> list[torch.Tensor]:
    """The encoder outputs of both clips, computed in one batch (different window counts)."""
    with torch.no_grad():
        return FAMILY.encode(model, *FAMILY.features(processor.feature_extractor, CLIPS))


def test_the_tiny_model_reloads_with_the_published_template_and_tokens(tiny_af3, processor):
    from transformers import AudioFlamingo3Processor, AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_af3)
    assert isinstance(processor, AudioFlamingo3Processor)
    assert AutoConfig.from_pretrained(tiny_af3).model_type in FAMILY.model_types
    for renderer in (processor, tokenizer):
        rendered = renderer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert rendered == PUBLISHED_PROMPT
    assert FAMILY.audio_token(processor) == "<sound>" and FAMILY.markup_tokens(tokenizer) == ("<sound>",)
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"} <= specials
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nnear 900 Hz\n</think>\nhigh\n"


def test_parts_cover_the_model_and_lora_reaches_only_the_language_model(reference):
    names = [n for n, _ in reference.named_parameters()]
    assert all(sum(n.startswith(p) for p in FAMILY.parts.values()) == 1 for n in names)
    target = re.compile(FAMILY.lora_target(["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1"]))
    wrapped = [n for n, _ in reference.named_modules() if target.fullmatch(n)]
    assert wrapped and all(n.startswith("model.language_model.layers.") for n in wrapped)


def test_audio_token_counts_match_the_processor(processor):
    fe = processor.feature_extractor.to_dict()
    for audio in CLIPS:
        ids = processor(text="<sound>", audio=[audio], return_tensors="pt")["input_ids"]
        placeholders = int((ids == processor.audio_token_id).sum())
        assert FAMILY.audio_tokens_per_item(len(audio) / 16000, fe) == placeholders
    assert FAMILY.audio_tokens_per_item(FAMILY.max_audio_seconds + 60, fe) == 750 * 20  # cut at 10 minutes


def test_processor_audio_inputs_are_the_processors(processor):
    enc = processor(text=["<sound>"] * len(CLIPS), audio=CLIPS, return_tensors="pt")
    ours = FAMILY.processor_audio_inputs(processor.feature_extractor, CLIPS)
    assert ours.keys() <= enc.keys() and all(torch.equal(ours[k], enc[k]) for k in ours)


def test_the_training_forward_is_the_models_own(reference, processor):
    encoded = encoded_clips(reference, processor)
    for audio, item in zip(CLIPS, encoded, strict=True):
        ids, expected = reference_logits(reference, processor, audio)
        got = family_logits(reference, ids, [item], torch.arange(len(ids)))
        assert (got - expected).abs().max().item() < 1e-5


def test_packed_samples_equal_each_alone(reference, processor):
    encoded = encoded_clips(reference, processor)
    rows = [reference_logits(reference, processor, audio)[0] for audio in CLIPS]
    positions = [torch.arange(len(ids)) for ids in rows]
    alone = [family_logits(reference, ids, [item], pos) for ids, item, pos in zip(rows, encoded, positions)]
    packed = family_logits(reference, torch.cat(rows), encoded, torch.cat(positions))
    assert (torch.cat(alone) - packed).abs().max().item() < 1e-5


def test_save_and_load_round_trip(tiny_af3, reference, tmp_path):
    state = {k: v + 0.25 for k, v in reference.state_dict().items()}
    FAMILY.save(reference, tmp_path, state)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {
        "audio_tower.conv1.weight",
        "multi_modal_projector.linear_1.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    } <= keys
    assert not any(k.startswith(("model.", "lm_head.", "language_model.model.model.")) for k in keys)
    loaded = FAMILY.load_for_training(tmp_path, torch.float32, "sdpa").state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.e2e
def test_vllm_serves_the_saved_model_with_the_same_logprobs(tiny_af3, reference, processor, request):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = offline_engine(tiny_af3, request)
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert greedy_token_count(llm, prompt, CLIPS[0]) == 8
    audio = CLIPS[1]  # two windows: vLLM's windowing must match the processor's
    ids, logits = reference_logits(reference, processor, audio)
    gap = logprob_gap(llm, prompt_text(processor), [audio], ids, logits)
    assert gap.mean().item() < 1e-3
    assert gap.max().item() < 1e-4  # another clip moves some by 2e-2
    # FAMILY.max_audio_items: vLLM caps the limit asked (2) at the one audio item AF3 supports.
    with pytest.raises(VLLMValidationError, match=f"At most {FAMILY.max_audio_items} audio"):
        llm.generate(
            [{"prompt": "<sound><sound>", "multi_modal_data": {"audio": [(CLIPS[0], 16000)] * 2}}],
            SamplingParams(max_tokens=1),
        )
