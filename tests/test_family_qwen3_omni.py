"""The Qwen3-Omni-MoE family (distill/models/qwen3_omni.py) on a tiny random Omni with 4 experts: the
template is the published one, the training forward (real frames only, packed rows, 3-D positions)
is the thinker's own, the full-Omni checkpoint (experts split per expert) round-trips, LoRA stays off
the experts, the router and the towers, and vLLM serves it with the same log-probabilities."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from distill.models.config import TinyModelConfig
from distill.models.qwen3_omni import CHAT_TEMPLATE, PROCESSOR_AUDIO_KWARGS, Qwen3Omni, split_experts
from tests.serving import greedy_token_count, logprob_gap, offline_engine

FAMILY = Qwen3Omni()
SYSTEM = "You are a helpful assistant that listens carefully and reasons about sounds."
QUESTION = "What is the sound?"
COMPLETION = "<think>\nnear 900 Hz\n</think>\nhigh<|im_end|>\n"
AUDIO = {"type": "audio", "audio": "clip"}
# What the template published with Qwen/Qwen3-Omni-30B-A3B-Thinking renders for system + user(audio,
# text): no "<think>" in the generation prompt (the model writes it; distill pre-fills it).
PUBLISHED_PROMPT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    f"<|audio_start|><|audio_pad|><|audio_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What LoRA must exclude beside the family's target regex (peft rewrites the regex for this model type).
TOWERS = r"(?:audio_tower|visual)\..*"


def messages(n_audio: int) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [AUDIO] * n_audio + [{"type": "text", "text": QUESTION}]},
    ]


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# Two lengths: the encoder reads each clip's real frames only, in 1 s (100-frame) chunks.
CLIPS = [clip(1.3, 0), clip(2.7, 1)]


@pytest.fixture(scope="module")
def tiny_omni(tmp_path_factory):
    FAMILY.prepare_runtime()
    out = tmp_path_factory.mktemp("q3") / "tiny"
    out.mkdir()
    FAMILY.build_tiny(out, TinyModelConfig(family=FAMILY.name))
    return out


@pytest.fixture(scope="module")
def processor(tiny_omni):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_omni)


@pytest.fixture(scope="module")
def reference(tiny_omni):
    return FAMILY.reference_model(tiny_omni)


def prompt_text(processor, n_audio: int) -> str:
    prompt = processor.apply_chat_template(messages(n_audio), tokenize=False, add_generation_prompt=True)
    return prompt + COMPLETION


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
        decoder = FAMILY.decoder(model)
        hidden = decoder(
            inputs_embeds=embeds, position_ids=FAMILY.position_ids(positions[None]), use_cache=False
        ).last_hidden_state
        return FAMILY.lm_head(model)(hidden)[0]


def encoded_clips(model, processor) -> list[torch.Tensor]:
    """The encoder outputs of both clips, computed in one batch."""
    with torch.no_grad():
        return FAMILY.encode(model, *FAMILY.features(processor.feature_extractor, CLIPS))


def saved_keys(model_dir) -> list[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_the_tiny_model_reloads_with_the_published_template_and_tokens(tiny_omni, processor):
    from transformers import AutoConfig, AutoTokenizer, Qwen3OmniMoeProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_omni)
    assert isinstance(processor, Qwen3OmniMoeProcessor)
    assert tokenizer.chat_template == processor.chat_template == CHAT_TEMPLATE
    for render in (processor.apply_chat_template, tokenizer.apply_chat_template):
        assert render(messages(1), tokenize=False, add_generation_prompt=True) == PUBLISHED_PROMPT
    no_thinking = tokenizer.apply_chat_template(
        messages(1), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_thinking == PUBLISHED_PROMPT + "<think>\n\n</think>\n\n"
    assert FAMILY.audio_token(processor) == "<|audio_pad|>"
    assert set(FAMILY.markup_tokens(tokenizer)) == {
        "<|audio_start|>",
        "<|audio_end|>",
        "<|audio_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    }
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nnear 900 Hz\n</think>\nhigh\n"
    config = AutoConfig.from_pretrained(tiny_omni)
    text, vision = FAMILY.text_config(config), config.thinker_config.vision_config
    assert config.model_type in FAMILY.model_types and not config.enable_audio_output
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert text.rope_parameters["mrope_interleaved"] and text.num_experts > text.num_experts_per_tok > 1
    assert vision.image_size // vision.patch_size == int(vision.num_position_embeddings**0.5)
    assert vision.apply_vit_abs_pos_embed


def lora_targets(model) -> list[str]:
    return [n for n, _ in model.named_modules() if re.fullmatch(FAMILY.lora_target(PROJECTIONS), n)]


def attention_projections(model) -> set[str]:
    return {
        f"model.layers.{i}.self_attn.{p}"
        for i in range(model.config.text_config.num_hidden_layers)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }


def adapted(peft_model) -> set[str]:
    return {
        n.removeprefix("base_model.model.").split(".lora_A")[0]
        for n, _ in peft_model.named_modules()
        if n.endswith("lora_A")
    }


def test_parts_cover_the_trainable_model_and_lora_scope_names_only_attention(reference):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    names = [n for n, _ in reference.named_parameters()]
    owners = [sum(n.startswith(p) for p in FAMILY.parts.values()) for n in names]
    assert all(count == (0 if n.startswith("visual.") else 1) for n, count in zip(names, owners))
    assert set(lora_targets(reference)) == attention_projections(reference)
    # A dense layer (mlp_only_layers) keeps its MLP out of scope as well.
    config = reference.config.__class__.from_dict(reference.config.to_dict())
    config.text_config.mlp_only_layers = [0]
    dense = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    assert set(lora_targets(dense)) == attention_projections(dense)


def test_lora_with_the_towers_excluded_wraps_only_the_language_models_attention(tiny_omni, reference):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=FAMILY.lora_target(PROJECTIONS), exclude_modules=TOWERS)
    peft_model = get_peft_model(FAMILY.reference_model(tiny_omni), config)
    assert adapted(peft_model) == attention_projections(reference)
    assert not config.target_parameters  # no LoRA on the fused experts
    assert not [n for n in adapted(peft_model) if re.search(r"^(audio_tower|visual)\.|\.mlp\.", n)]


def test_distills_add_lora_leaves_the_audio_tower_plain(tiny_omni):
    from distill.training.config import TrainConfig
    from distill.training.model import add_lora

    tcfg = TrainConfig()
    tcfg.lora.enabled = True
    peft_model = add_lora(FAMILY.reference_model(tiny_omni), FAMILY, tcfg)
    assert not [n for n in adapted(peft_model) if n.startswith(("audio_tower.", "visual."))]


def audio_tokens(processor, audio: list[np.ndarray]) -> int:
    ids = processor(text="<|audio_pad|>" * len(audio), audio=audio, return_tensors="pt")["input_ids"]
    return int((ids == processor.tokenizer.convert_tokens_to_ids("<|audio_pad|>")).sum())


def test_features_are_each_clips_own_processor_features(processor):
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessorKwargs

    defaults = Qwen3OmniMoeProcessorKwargs._defaults["audio_kwargs"]
    assert {k: defaults[k] for k in PROCESSOR_AUDIO_KWARGS} == PROCESSOR_AUDIO_KWARGS
    features, mask = FAMILY.features(processor.feature_extractor, CLIPS)
    assert features.shape[-1] == int(mask.sum(-1).max()) == 270  # the longest clip, no 30 s window
    for i, audio in enumerate(CLIPS):
        alone = processed(processor, [audio])
        n = alone["feature_attention_mask"].shape[-1]
        assert torch.equal(features[i, :, :n], alone["input_features"][0]) and int(mask[i].sum()) == n
    # Beside a longer clip the processor's last frame of the shorter one reads zero padding, not a reflection.
    batched = processed(processor, CLIPS)
    assert torch.equal(mask, batched["feature_attention_mask"])
    differs = ((features != batched["input_features"]).any(1) & mask.bool()).nonzero().tolist()
    assert differs == [[0, 129]]  # real frames only: the padding holds zeros, not the log-mel of silence
    # A length off the hop gains a frame beside a longer clip: here an audio token, which the
    # processor's count of a one-clip prompt does not have. The family counts as for the clip alone.
    odd, long = clip(1.085, 3), clip(3.0, 4)  # 108.5 hops: 108 frames alone, 109 beside `long`
    beside = audio_tokens(processor, [odd, long]) - audio_tokens(processor, [long])
    assert beside == audio_tokens(processor, [odd]) + 1
    assert FAMILY.features(processor.feature_extractor, [odd, long])[1].sum(-1).tolist() == [108, 300]
    fe_config = processor.feature_extractor.to_dict()
    for audio in CLIPS + [clip(1.0, 2), clip(40.0, 2), odd]:
        count = audio_tokens(processor, [audio])
        most = count + (audio is odd)  # what the item may take beside a longer one
        assert FAMILY.audio_tokens_per_item(len(audio) / 16000, fe_config) == most
    assert FAMILY.audio_tokens_per_item(1.0, fe_config) == 13
    assert FAMILY.max_item_seconds(fe_config) == FAMILY.max_audio_seconds == 300


def test_the_training_forward_is_the_thinkers_own(reference, processor):
    # The reference reads both clips from one processor call: the shorter clip's last frame differs
    # (zero padding, see above), which moves its logits by a few 1e-6 here.
    enc, expected = reference_forward(reference, processor, CLIPS)
    ids = enc["input_ids"][0]
    encoded = encoded_clips(reference, processor)
    features, mask = FAMILY.features(processor.feature_extractor, CLIPS)
    own = reference.get_audio_features(features, mask).last_hidden_state
    assert torch.equal(torch.cat(encoded), own)
    assert [len(e) for e in encoded] == [17, 35]  # 13 per full second, then the rest's share
    # Audio-only prompts: transformers' M-RoPE positions are sequential in all three rows.
    rope, _ = reference.get_rope_index(
        enc["input_ids"], None, None, enc["attention_mask"], False, enc["feature_attention_mask"].sum(-1)
    )
    assert torch.equal(rope, torch.arange(len(ids)).expand(3, 1, -1).float())
    got = family_logits(reference, ids, encoded, torch.arange(len(ids)))
    assert (got - expected).abs().max().item() < 1e-5


def test_packed_samples_equal_each_alone(reference, processor):
    encoded = encoded_clips(reference, processor)
    rows = [processed(processor, [audio])["input_ids"][0] for audio in CLIPS]
    alone = [
        family_logits(reference, ids, [item], torch.arange(len(ids))) for ids, item in zip(rows, encoded)
    ]
    positions = torch.cat([torch.arange(len(ids)) for ids in rows])
    packed = family_logits(reference, torch.cat(rows), encoded, positions)
    assert (torch.cat(alone) - packed).abs().max().item() < 1e-5


def test_save_and_load_round_trip_with_experts_split_per_expert(reference, tmp_path):
    state = {k: v + 0.25 for k, v in reference.state_dict().items()}
    FAMILY.save(reference, tmp_path, state)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_omni_moe"
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    keys = saved_keys(tmp_path)
    assert all(k.startswith("thinker.") for k in keys)
    assert not [k for k in keys if k.endswith(("gate_up_proj", "experts.down_proj"))]  # no fused tensor
    text = reference.config.text_config
    for name in ("gate_proj", "up_proj", "down_proj"):
        per_expert = rf"thinker\.model\.layers\.\d+\.mlp\.experts\.\d+\.{name}\.weight"
        count = sum(re.fullmatch(per_expert, k) is not None for k in keys)
        assert count == text.num_hidden_layers * text.num_experts
    loaded = FAMILY.load_for_training(tmp_path, torch.bfloat16, "eager")
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "eager"
    loaded = FAMILY.load_for_training(tmp_path, torch.float32, "sdpa").state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_expert_split_inverts_transformers_fusion():
    mlp = "model.layers.3.mlp."
    experts = {
        mlp + "experts.gate_up_proj": torch.randn(4, 6, 5),
        mlp + "experts.down_proj": torch.randn(4, 5, 3),
        mlp + "gate.weight": torch.randn(4, 5),
    }
    split = split_experts(experts)
    assert split[mlp + "gate.weight"] is experts[mlp + "gate.weight"] and len(split) == 13
    fused = torch.stack(
        [
            torch.cat(
                [split[f"{mlp}experts.{e}.gate_proj.weight"], split[f"{mlp}experts.{e}.up_proj.weight"]]
            )
            for e in range(4)
        ]
    )
    down = torch.stack([split[f"{mlp}experts.{e}.down_proj.weight"] for e in range(4)])
    assert torch.equal(fused, experts[mlp + "experts.gate_up_proj"])
    assert torch.equal(down, experts[mlp + "experts.down_proj"])


def test_loading_reads_shards_fused_experts_skips_speech_weights_and_refuses_a_partial_thinker(
    tiny_omni, reference, tmp_path
):
    from huggingface_hub import save_torch_state_dict

    split = FAMILY.checkpoint_state_dict(reference.state_dict())
    fused = {"thinker." + k: v for k, v in reference.state_dict().items()}
    layouts = {
        "sharded": {**split, "talker.codec_head.weight": torch.zeros(2)},
        "fused": fused,
        "partial": {k: v for k, v in split.items() if ".experts.3." not in k},
    }
    for name, weights in layouts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tiny_omni / "config.json").read_text())
        save_torch_state_dict(weights, tmp_path / name, max_shard_size="1MB" if name == "sharded" else "5GB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for name in ("sharded", "fused"):
        loaded = FAMILY.load_for_training(tmp_path / name, torch.float32, "sdpa").state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(ValueError, match=r"mismatched: model\.layers\.0\.mlp\.experts\.down_proj \(3, "):
        FAMILY.load_for_training(tmp_path / "partial", torch.float32, "sdpa")


@pytest.mark.e2e
def test_vllm_serves_the_saved_model_with_the_same_logprobs(tiny_omni, reference, processor, request):
    llm = offline_engine(tiny_omni, request)
    prompt = processor.apply_chat_template(messages(1), tokenize=False, add_generation_prompt=True)
    assert greedy_token_count(llm, prompt, CLIPS[0]) == 8
    enc, logits = reference_forward(reference, processor, CLIPS)
    gap = logprob_gap(llm, prompt_text(processor, 2), CLIPS, enc["input_ids"][0], logits)
    assert gap.mean().item() < 1e-3
