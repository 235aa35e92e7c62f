"""The Qwen2.5-Omni family (distill/models/qwen2_5_omni.py) on a tiny random Omni: the template is
the published one, the training forward (real frames only, packed rows, 3-D positions) is the
thinker's own, the full-Omni checkpoint round-trips and vLLM serves it with the same log-probabilities."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from distill.models.config import TinyModelConfig
from distill.models.qwen2_5_omni import CHAT_TEMPLATE, Qwen25Omni
from tests.serving import greedy_token_count, logprob_gap, offline_engine

FAMILY = Qwen25Omni()
SYSTEM = "You are a helpful assistant that listens carefully and reasons about sounds."
QUESTION = "What is the sound?"
COMPLETION = "<think>\nnear 900 Hz\n</think>\nhigh<|im_end|>\n"
AUDIO = {"type": "audio", "audio": "clip"}
# What the template published with Qwen/Qwen2.5-Omni-7B renders for system + user(audio, text).
PUBLISHED_PROMPT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>"
    f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)


def messages(n_audio: int) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [AUDIO] * n_audio + [{"type": "text", "text": QUESTION}]},
    ]


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# Two lengths: the encoder reads each clip's real frames only, in 2 s windows.
CLIPS = [clip(1.3, 0), clip(2.7, 1)]


@pytest.fixture(scope="module")
def tiny_omni(tmp_path_factory):
    FAMILY.prepare_runtime()
    out = tmp_path_factory.mktemp("q25") / "tiny"
    FAMILY.build_tiny(out, TinyModelConfig())
    return out


@pytest.fixture(scope="module")
def processor(tiny_omni):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_omni)


@pytest.fixture(scope="module")
def reference(tiny_omni):
    return FAMILY.reference_model(tiny_omni)


def prompt_text(processor, n_audio: int) -> str:
    return (
        processor.apply_chat_template(messages(n_audio), tokenize=False, add_generation_prompt=True)
        + COMPLETION
    )


def processed(processor, audio: list[np.ndarray]):
    return processor(text=prompt_text(processor, len(audio)), audio=audio, return_tensors="pt")


def reference_forward(model, processor, audio: list[np.ndarray]):
    """(processor output, logits) of the thinker's own forward."""
    enc = processed(processor, audio)
    with torch.no_grad():
        return enc, model(**enc).logits[0]


def family_logits(
    model, ids: torch.Tensor, encoded: list[torch.Tensor], positions: torch.Tensor
) -> torch.Tensor:
    """Logits of one row through the family's methods, as distill's training forward runs them."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[None])
        slots = (ids == model.config.audio_token_id)[None, :, None]
        embeds = embeds.masked_scatter(slots, FAMILY.project(model, torch.cat(encoded)))
        hidden = FAMILY.decoder(model)(
            inputs_embeds=embeds, position_ids=FAMILY.position_ids(positions[None]), use_cache=False
        ).last_hidden_state
        return FAMILY.lm_head(model)(hidden)[0]


def encoded_clips(model, processor) -> list[torch.Tensor]:
    """The encoder outputs of both clips, computed in one batch."""
    with torch.no_grad():
        return FAMILY.encode(model, *FAMILY.features(processor.feature_extractor, CLIPS))


def test_the_tiny_model_reloads_with_the_published_template_and_tokens(tiny_omni, processor):
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5OmniProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_omni)
    assert isinstance(processor, Qwen2_5OmniProcessor)
    published = tokenizer.apply_chat_template(
        messages(1), chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert published == PUBLISHED_PROMPT
    assert processor.apply_chat_template(messages(1), tokenize=False, add_generation_prompt=True) == published
    assert tokenizer.apply_chat_template(messages(1), tokenize=False, add_generation_prompt=True) == published
    assert FAMILY.audio_token(processor) == "<|AUDIO|>"
    assert set(FAMILY.markup_tokens(tokenizer)) == {
        "<|AUDIO|>",
        "<|audio_bos|>",
        "<|audio_eos|>",
        "<|IMAGE|>",
        "<|VIDEO|>",
        "<|vision_bos|>",
        "<|vision_eos|>",
    }
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nnear 900 Hz\n</think>\nhigh\n"
    config = AutoConfig.from_pretrained(tiny_omni)
    text = FAMILY.text_config(config)
    assert config.model_type in FAMILY.model_types and not config.enable_audio_output
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2


def test_parts_cover_the_trainable_model_and_lora_reaches_only_the_language_model(tiny_omni, reference):
    from peft import LoraConfig, get_peft_model

    from distill.training.model import part_of

    names = [n for n, _ in reference.named_parameters()]
    owners = {n: part_of(FAMILY, n) for n in names}
    assert all((owner is None) == n.startswith("visual.") for n, owner in owners.items())
    assert {n for n, owner in owners.items() if owner == "projector"} == {
        "audio_tower.proj.weight",
        "audio_tower.proj.bias",
    }
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = [n for n, _ in reference.named_modules() if re.fullmatch(FAMILY.lora_target(projections), n)]
    assert len(wrapped) == reference.config.text_config.num_hidden_layers * len(projections)
    assert all(n.startswith("model.layers.") for n in wrapped)
    peft_model = get_peft_model(
        FAMILY.reference_model(tiny_omni), LoraConfig(r=2, target_modules=FAMILY.lora_target(projections))
    )
    lora = {
        n.removeprefix("base_model.model.").split(".lora_A")[0]
        for n, _ in peft_model.named_modules()
        if n.endswith("lora_A")
    }
    assert lora == set(wrapped)


def test_features_are_the_processors_real_frames(processor):
    fe = processor.feature_extractor
    features, mask = FAMILY.features(fe, CLIPS)
    full = fe(
        CLIPS, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt"
    )
    lengths = full["attention_mask"].sum(-1)
    assert features.shape[-1] == int(lengths.max()) < full["input_features"].shape[-1] == 3000
    assert torch.equal(mask.sum(-1), lengths)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(features[i, :, :n], full["input_features"][i, :, :n])
    fe_config = fe.to_dict()
    for audio in CLIPS + [clip(40.0, 2)]:
        enc = processor(text="<|AUDIO|>", audio=[audio], return_tensors="pt")
        count = int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum())
        assert FAMILY.audio_tokens_per_item(len(audio) / 16000, fe_config) == count
    published = {**fe_config, "chunk_length": 300}  # Qwen/Qwen2.5-Omni-7B's window
    assert FAMILY.audio_tokens_per_item(FAMILY.max_audio_seconds + 60, published) == 7500


def test_the_training_forward_is_the_thinkers_own(reference, processor):
    enc, expected = reference_forward(reference, processor, CLIPS)
    ids = enc["input_ids"][0]
    encoded = encoded_clips(reference, processor)
    own = reference.get_audio_features(enc["input_features"], enc["feature_attention_mask"]).last_hidden_state
    assert torch.equal(FAMILY.project(reference, torch.cat(encoded)), own)
    # Audio-only prompts: transformers' M-RoPE positions are sequential in all three rows.
    rope, _ = reference.get_rope_index(
        enc["input_ids"], None, None, enc["attention_mask"], False, enc["feature_attention_mask"].sum(-1)
    )
    assert torch.equal(rope, torch.arange(len(ids)).expand(3, 1, -1))
    got = family_logits(reference, ids, encoded, torch.arange(len(ids)))
    assert (got - expected).abs().max().item() < 1e-5


def test_packed_samples_equal_each_alone(reference, processor):
    encoded = encoded_clips(reference, processor)
    rows = [processed(processor, [audio])["input_ids"][0] for audio in CLIPS]
    alone = [
        family_logits(reference, ids, [item], torch.arange(len(ids))) for ids, item in zip(rows, encoded)
    ]
    packed = family_logits(
        reference, torch.cat(rows), encoded, torch.cat([torch.arange(len(ids)) for ids in rows])
    )
    assert (torch.cat(alone) - packed).abs().max().item() < 1e-5


def test_save_and_load_round_trip(reference, tmp_path):
    state = {k: v + 0.25 for k, v in reference.state_dict().items()}
    FAMILY.save(reference, tmp_path, state)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["architectures"] == [
        "Qwen2_5OmniForConditionalGeneration"
    ]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = f.keys()
    assert all(k.startswith("thinker.") for k in keys)
    loaded = FAMILY.load_for_training(tmp_path, torch.bfloat16, "eager")
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "eager"
    loaded = FAMILY.load_for_training(tmp_path, torch.float32, "sdpa").state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_tied_embeddings_are_saved_under_embed_tokens(reference, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    config = reference.config.__class__.from_dict(reference.config.to_dict())
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    tied = Qwen2_5OmniThinkerForConditionalGeneration(config)
    FAMILY.save(tied, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = f.keys()
    assert "thinker.model.embed_tokens.weight" in keys and "thinker.lm_head.weight" not in keys
    loaded = FAMILY.load_for_training(tmp_path, torch.float32, "sdpa")
    assert torch.equal(loaded.lm_head.weight, tied.model.embed_tokens.weight)


def test_loading_reads_shards_skips_speech_weights_and_refuses_a_partial_thinker(
    tiny_omni, reference, tmp_path
):
    from huggingface_hub import save_torch_state_dict

    state = FAMILY.checkpoint_state_dict(reference.state_dict())
    for name, extra in (("full", {"talker.codec_head.weight": torch.zeros(2)}), ("partial", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tiny_omni / "config.json").read_text())
        weights = {k: v for k, v in state.items() if name == "full" or k != "thinker.lm_head.weight"}
        save_torch_state_dict({**weights, **extra}, tmp_path / name, max_shard_size="1MB")
    assert (tmp_path / "full" / "model.safetensors.index.json").exists()
    loaded = FAMILY.load_for_training(tmp_path / "full", torch.float32, "sdpa").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(ValueError, match="missing: lm_head.weight"):
        FAMILY.load_for_training(tmp_path / "partial", torch.float32, "sdpa")


@pytest.mark.e2e
def test_vllm_serves_the_saved_model_with_the_same_logprobs(tiny_omni, reference, processor, request):
    llm = offline_engine(tiny_omni, request)
    prompt = processor.apply_chat_template(messages(1), tokenize=False, add_generation_prompt=True)
    assert greedy_token_count(llm, prompt, CLIPS[0]) == 8
    enc, logits = reference_forward(reference, processor, CLIPS)
    gap = logprob_gap(llm, prompt_text(processor, 2), CLIPS, enc["input_ids"][0], logits)
    assert gap.mean().item() < 1e-3
