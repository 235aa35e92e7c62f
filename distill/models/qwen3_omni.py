"""Qwen3-Omni-MoE (Qwen3OmniMoeForConditionalGeneration): distill trains its thinker, an audio
encoder that reads variable-length audio (mel frames in 100-frame chunks, 13 embeddings each) and
projects it to the text width itself, a vision encoder (always frozen here), and a Qwen3-MoE
language model with interleaved 3-D M-RoPE. Checkpoints keep the full-Omni layout vLLM loads:
`thinker.*` keys under model_type qwen3_omni_moe, experts stored one by one as the published
checkpoints store them (transformers keeps them fused in 3-D tensors)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from distill.models.omni_thinker import OmniThinker, mrope_section
from distill.models.tokenizer import train_tokenizer

# The published tokenizer's chat and multimodal special tokens, in the order of their ids.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
]
# Tokenizer attributes the Omni processor reads (tokenizer_config.json of Qwen/Qwen3-Omni-30B-A3B-*).
TOKEN_ATTRIBUTES = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}

# The chat template published with Qwen/Qwen3-Omni-30B-A3B-Thinking (revision 2f443cfc), verbatim.
# Source: xorbitsai/inference, xinference/model/llm/llm_family.json, entry "Qwen3-Omni-Thinking"
# (added in a53c193, October 2025; later moved to xinference/model/llm/models/Qwen3-Omni-Thinking.json),
# which copies the Hub's template. Its generation prompt is "<|im_start|>assistant\n" alone: the
# Thinking model writes "<think>\n" itself (distill pre-fills it, sample.generation_prefix); only
# enable_thinking=False adds an empty think block. No default system prompt.
CHAT_TEMPLATE = (
    r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"""
    r"""You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments """
    r"""within <tool_call></tool_call> XML tags:\n<tool_call>\n"""
    r"""{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {{- '<|im_start|>system\n' """
    r"""+"<|vision_start|><|image_pad|><|vision_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'audio' or 'audio' in content or 'audio_url' in content %}
                    {{- '<|im_start|>system\n' +"<|audio_start|><|audio_pad|><|audio_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'video' or 'video' in content %}
                    {{- '<|im_start|>system\n' """
    r"""+"<|vision_start|><|video_pad|><|vision_end|>"+ '<|im_end|>\n' }}
                {%- elif content.type == 'text' %}
                    {{- '<|im_start|>system\n' +content.text+ '<|im_end|>\n' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and """
    r"""not(message.content.startswith('<tool_response>') and """
    r"""message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = namespace(text="") %}
        {%- for mcontent in message.content %}
            {%- if mcontent.type == 'image' or 'image' in mcontent or 'image_url' in mcontent %}
                {%- set content.text = content.text~"<|vision_start|><|image_pad|><|vision_end|>" %}
            {%- elif mcontent.type == 'audio' or 'audio' in mcontent or 'audio_url' in mcontent %}
                {%- set content.text = content.text~"<|audio_start|><|audio_pad|><|audio_end|>" %}
            {%- elif mcontent.type == 'video' or 'video' in mcontent %}
                {%- set content.text = content.text~"<|vision_start|><|video_pad|><|vision_end|>" %}
            {%- elif mcontent.type == 'text' %}
                {%- set content.text = content.text~mcontent.text %}
            {%- endif %}
        {%- endfor %}
        {%- set content = content.text %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = "" %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')"""
    r""".split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query_index %}
        {%- if loop.last or (not loop.last and reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip("\n") """
    r"""+ '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content }}
    {%- endif %}
    {%- if message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}"""
    r"""{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}"""
    r"""{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""
)

# Full-Omni modules distill never loads: the speech output side.
SPEECH_PREFIXES = ("talker.", "code2wav.")
ARCHITECTURES = ["Qwen3OmniMoeForConditionalGeneration"]
# transformers' fused expert tensors (gate_up_proj [experts, 2 x intermediate, hidden], gate half
# first; down_proj [experts, hidden, intermediate]), which checkpoints store one expert at a time.
FUSED_EXPERTS = re.compile(r"(?P<base>.*\.mlp\.experts\.)(?P<kind>gate_up_proj|down_proj)")
# Qwen3OmniMoeProcessorKwargs' audio defaults: pad to the longest clip of the call, cut nothing.
PROCESSOR_AUDIO_KWARGS = {"padding": True, "truncation": False, "return_attention_mask": True}
# The published Whisper front end (preprocessor_config.json of Qwen/Qwen3-Omni-30B-A3B-*): 128 mel
# bins at 16 kHz, hop 160, and a 300 s window (n_samples 4,800,000) that only padding="max_length" fills.
MEL_BINS = 128
SAMPLING_RATE = 16000
HOP_LENGTH = 160
CHUNK_SECONDS = 300
# Mel frames per encoder chunk are 2 x n_window; the processor's n_window (it must match the encoder's).
N_WINDOW = 50
# The longest item distill feeds: the published window. Neither the processor nor the encoder cuts
# longer audio, but vLLM serves an item only if its embeddings (13 a second, 3900 for 300 s) fit its
# encoder cache (max_num_batched_tokens: 4096 by default on CPU, 8192 or more on GPU).
MAX_AUDIO_SECONDS = 300.0
# A tiny MoE: a few experts, two per token (the published model: 128 and 8).
TINY_EXPERTS = 4
TINY_EXPERTS_PER_TOKEN = 2
# The audio encoder's convolution channels (the published model: 480).
TINY_DOWNSAMPLE_CHANNELS = 32
# A tiny vision tower: the thinker class needs one; audio-only use never runs it. Heads of 32
# dimensions suit vLLM's CPU attention; 64 position embeddings make an 8 x 8 patch grid.
TINY_VISION = {
    "depth": 1,
    "hidden_size": 64,
    "num_heads": 2,
    "intermediate_size": 128,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0],
}
TINY_ROPE_THETA = 1000000.0
TINY_MAX_POSITIONS = 4096


# The time rows' share of M-RoPE frequencies in the published model (mrope_section).
MROPE_TIME_SHARE = 0.375


class Qwen3Omni(OmniThinker):
    name = "qwen3_omni_moe"
    title = "Qwen3-Omni-MoE"
    model_types = ("qwen3_omni_moe",)
    # The audio tower ends in its own projection (proj1, proj2) to the text width: no separate projector.
    parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "audio_encoder": ("audio_tower.",),
        "projector": (),
        "language_model": ("model.", "lm_head."),
    }
    # The text model's attention projections only. Every published layer is MoE: its experts are fused
    # 3-D parameters, not Linear modules LoRA wraps, and its router (mlp.gate) must keep routing as
    # trained; both train under full fine-tuning only. Dense MLPs (mlp_only_layers, none published)
    # stay out too: for this model type peft (0.21, transformers 5) turns the names gate_proj, up_proj
    # and down_proj into LoRA on the fused expert tensors, which distill's merge does not handle.
    # Anchored at `model.layers.N.self_attn` (the audio tower has projections of the same names).
    lora_scope = r"(?:base_model\.model\.)?model\.layers\.\d+\.self_attn\.({})"
    # peft (0.21, transformers 5) turns a regex scope into bare leaf names for MoE model types, which
    # the audio tower's q/k/v projections also carry: keep the towers out explicitly.
    lora_exclude = r"(?:audio_tower|visual)\..*"
    max_audio_seconds = MAX_AUDIO_SECONDS
    speech_prefixes = SPEECH_PREFIXES

    # --- loading and saving -------------------------------------------------------------
    def thinker_class(self) -> type:
        from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

        return Qwen3OmniMoeThinkerForConditionalGeneration

    def omni_config(self, thinker_config: dict, dtype: torch.dtype) -> Any:
        return full_config(thinker_config, dtype)

    def checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`thinker.*` keys, experts split one by one (what vLLM's Qwen3-MoE loader maps). transformers'
        conversion for this model type fuses per-expert keys again on load."""
        return super().checkpoint_state_dict(split_experts(state))

    def build_tiny(self, out_dir: Path, cfg: Any) -> None:
        """A tiny random thinker (4 experts, top-2) saved as a full-Omni checkpoint, with the published
        special tokens, chat template and processor, into the empty folder `out_dir`."""
        from transformers import (
            GenerationConfig,
            Qwen3OmniMoeThinkerConfig,
            Qwen3OmniMoeThinkerForConditionalGeneration,
        )

        self.prepare_runtime()
        tokenizer = train_tokenizer(
            cfg.vocab_size, SPECIAL_TOKENS, CHAT_TEMPLATE, extra_special_tokens=TOKEN_ATTRIBUTES
        )
        torch.manual_seed(cfg.seed)
        model = Qwen3OmniMoeThinkerForConditionalGeneration(
            Qwen3OmniMoeThinkerConfig(**tiny_thinker_config(cfg, tokenizer))
        )
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        self.save(model, out_dir)
        tiny_processor(tokenizer).save_pretrained(out_dir)

    # --- the training forward -----------------------------------------------------------
    def serving_audio(self, feature_extractor, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """Each waveform zero-padded to a whole number of hops, as vLLM's Qwen3-Omni processing does
        before the processor (so that its cache works with padding): a clip whose length is off the
        hop otherwise gets other last frames, and its trained model scores differently in vLLM."""
        hop = feature_extractor.hop_length
        return [np.pad(chunk, (0, -len(chunk) % hop)) for chunk in chunks]

    def features(self, feature_extractor, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's features as the processor makes them for that chunk alone (no 30 s window),
        zero-padded to the longest chunk's frames. The processor pads a call's clips to the longest
        waveform, so a shorter clip's frames depend on its company: its last frame reads zeros
        instead of a reflection, and a length off the hop gains one frame (a one-clip prompt
        counts floor(samples / hop)). Alone, they are what one-clip prompts are built from, and
        the same whatever batch computes them (the encoder cache relies on it)."""
        encs = [self._extract(feature_extractor, [chunk]) for chunk in chunks]
        width = max(enc["attention_mask"].shape[-1] for enc in encs)
        features = torch.cat([pad_frames(enc["input_features"], width) for enc in encs])
        mask = torch.cat([pad_frames(enc["attention_mask"], width) for enc in encs])
        return features, mask

    def processor_audio_inputs(self, feature_extractor, chunks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """What the processor gives the thinker's forward (it pads to the longest clip only)."""
        enc = self._extract(feature_extractor, chunks)
        return {"input_features": enc["input_features"], "feature_attention_mask": enc["attention_mask"]}

    @staticmethod
    def _extract(feature_extractor, chunks: list[np.ndarray]):
        return feature_extractor(
            chunks,
            sampling_rate=feature_extractor.sampling_rate,
            return_tensors="pt",
            **PROCESSOR_AUDIO_KWARGS,
        )

    def encode(
        self, model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each chunk's audio embeddings (already projected to the text width), as the thinker's
        get_audio_features computes them: the real frames of all chunks, concatenated."""
        tower = model.audio_tower
        lengths = mask.sum(-1)
        frames = features.transpose(1, 2)[mask.bool()].T  # [mel, real frames of every chunk]
        hidden = tower(frames, feature_lens=lengths).last_hidden_state
        return list(hidden.split(audio_output_lengths(lengths, tower.config.n_window).tolist()))

    def audio_tokens_per_item(self, seconds: float, feature_extractor_config: dict) -> int:
        """Mel frames of the item (every started hop: as many as the processor gives a clip padded
        beside a longer one, one more than alone when the length is no multiple of the hop), then
        13 embeddings per 100-frame chunk and the convolutions' share of the rest. Nothing is cut."""
        rate = feature_extractor_config.get("sampling_rate", SAMPLING_RATE)
        hop = feature_extractor_config.get("hop_length", HOP_LENGTH)
        samples = math.ceil(round(seconds * rate, 3))  # round: 1.3 * 16000 is 20800.000000000004
        return int(audio_output_lengths(math.ceil(samples / hop), N_WINDOW))


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors -> one gate_proj, up_proj and down_proj weight per expert.
    Copies: safetensors refuses tensors that share storage."""
    out = {}
    for key, value in state.items():
        match = FUSED_EXPERTS.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        for expert, weight in enumerate(value):
            prefix = f"{match['base']}{expert}."
            if match["kind"] == "down_proj":
                out[prefix + "down_proj.weight"] = weight.clone()
            else:
                gate, up = weight.chunk(2)
                out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = gate.clone(), up.clone()
    return out


def pad_frames(values: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros after the last frame (dimension -1), up to `width` frames."""
    return torch.nn.functional.pad(values, (0, width - values.shape[-1]))


def _convolutions(frames):
    """Length after the encoder's three stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def audio_output_lengths(frames, n_window: int):
    """Audio embeddings of `frames` mel frames (int or tensor): the encoder convolves each chunk of
    2 x n_window frames separately (13 embeddings for a full 100-frame chunk), then the remainder."""
    chunk = 2 * n_window
    return _convolutions(frames % chunk) + frames // chunk * _convolutions(chunk)


def full_config(thinker_config: dict, dtype: torch.dtype):
    """The full-Omni config vLLM loads: the thinker only (enable_audio_output=False), with the vision
    keys vLLM's vision tower reads and transformers does not write: image_size (the side of the
    position-embedding grid in pixels) and apply_vit_abs_pos_embed (transformers always adds them)."""
    from transformers import Qwen3OmniMoeConfig

    vision = dict(thinker_config["vision_config"])
    grid = math.isqrt(vision["num_position_embeddings"])
    vision.setdefault("image_size", grid * vision["patch_size"])
    vision.setdefault("apply_vit_abs_pos_embed", True)
    thinker_config = {**thinker_config, "vision_config": vision, "dtype": dtype}
    config = Qwen3OmniMoeConfig(thinker_config=thinker_config, enable_audio_output=False)
    config.architectures = ARCHITECTURES
    config.dtype = dtype
    return config


def tiny_thinker_config(cfg: Any, tokenizer) -> dict:
    """Qwen3OmniMoeThinkerConfig arguments of the sizes in `cfg` (a TinyModelConfig)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_ATTRIBUTES.items()}
    head_dim = cfg.text_hidden // cfg.text_heads
    return {
        "audio_config": {
            "d_model": cfg.audio_d_model,
            "encoder_layers": cfg.audio_layers,
            "encoder_attention_heads": cfg.audio_heads,
            "encoder_ffn_dim": cfg.audio_d_model * 4,
            "num_mel_bins": MEL_BINS,
            "n_window": N_WINDOW,
            "downsample_hidden_size": TINY_DOWNSAMPLE_CHANNELS,
            "output_dim": cfg.text_hidden,
        },
        "vision_config": {**TINY_VISION, "out_hidden_size": cfg.text_hidden},
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads,
            "num_experts": TINY_EXPERTS,
            "num_experts_per_tok": TINY_EXPERTS_PER_TOKEN,
            "moe_intermediate_size": cfg.text_intermediate // TINY_EXPERTS_PER_TOKEN,
            "max_position_embeddings": TINY_MAX_POSITIONS,
            "tie_word_embeddings": False,
            # Interleaved M-RoPE as published: transformers always interleaves, vLLM when told.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": TINY_ROPE_THETA,
                "mrope_section": mrope_section(head_dim, MROPE_TIME_SHARE),
                "interleaved": True,
                "mrope_interleaved": True,
            },
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
        },
        "audio_token_id": ids["audio_token"],
        "image_token_id": ids["image_token"],
        "video_token_id": ids["video_token"],
        "audio_start_token_id": ids["audio_bos_token"],
        "audio_end_token_id": ids["audio_eos_token"],
        "vision_start_token_id": ids["vision_bos_token"],
        "vision_end_token_id": ids["vision_eos_token"],
    }


def tiny_processor(tokenizer):
    """Qwen3OmniMoeProcessor with the published Whisper front end, the PIL Qwen2-VL image processor
    (16-pixel patches) and the video processor registered for the family (a null one on CPU installs,
    omni_cpu)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    video_processor = VIDEO_PROCESSOR_MAPPING[Qwen3OmniMoeConfig]["torchvision"]()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=CHUNK_SECONDS, hop_length=HOP_LENGTH
    )
    image_processor = Qwen2VLImageProcessorPil(patch_size=TINY_VISION["patch_size"])
    return Qwen3OmniMoeProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
