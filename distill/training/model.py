"""The model side of SFT: which parts train, LoRA, and the audio path of the forward pass.

The forward pass builds the language model's input embeddings itself: token embeddings with the
projected audio encoder output written over the audio placeholders (what each family's own
forward does), then the language model on packed rows. Doing it here lets a frozen encoder's
output be cached per clip: the traces of one item share its audio, and every epoch sees it again.
What differs between architectures comes from the model's family (distill/models).
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict

import numpy as np
import torch

from distill.models.registry import Family, family_of
from distill.training.config import TrainConfig
from distill.training.loss import token_logprobs, weighted_loss


class AudioEncoderCache:
    """Encoder outputs by clip key, least recently used first out, bounded in bytes. Kept on the
    CPU: a GPU's memory is worth more to activations than to a cache."""

    def __init__(self, max_mb: int):
        self.max_bytes = max_mb * 2**20
        self.bytes = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu").clone()  # a slice would keep its whole padded batch alive
        self.entries[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def part_of(family: Family, name: str) -> str | None:
    """The trainable part a parameter belongs to, by its longest matching prefix (a projector may
    sit inside the encoder's module); None: a module the loop never feeds, always frozen."""
    matches = [
        (len(prefix), part)
        for part, prefixes in family.parts.items()
        for prefix in prefixes
        if name.startswith(prefix)
    ]
    return max(matches)[1] if matches else None


def set_trainable(model, family: Family, tcfg: TrainConfig) -> None:
    """requires_grad per part: the audio encoder, the projector, the language model (with LoRA,
    only its adapters train)."""
    parts = tcfg.trainable
    for name, param in model.named_parameters():
        part = part_of(family, name)
        param.requires_grad_(
            part is not None and getattr(parts, part) and not (tcfg.lora.enabled and part == "language_model")
        )


def add_lora(model, family: Family, tcfg: TrainConfig):
    """Wrap the language model's projections (never the audio encoder's) with LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    lcfg = tcfg.lora
    config = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=family.lora_target(list(lcfg.target_modules)),
        exclude_modules=family.lora_exclude,
    )
    peft_model = get_peft_model(model, config)
    # peft's matching of a scope has changed between versions: check what it wrapped.
    outside = [
        name
        for name, module in peft_model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and part_of(family, name + ".") != "language_model"
    ]
    if outside:
        raise RuntimeError(
            f"LoRA wrapped modules outside the language model ({', '.join(outside[:3])}, ...): the "
            f"{family.title} family's lora_scope/lora_exclude no longer fit this peft version"
        )
    # get_peft_model freezes everything but the adapters; give the projector its setting back.
    for name, param in peft_model.base_model.model.named_parameters():
        if part_of(family, name) == "projector":
            param.requires_grad_(tcfg.trainable.projector)
    return peft_model


def merged_state_dict(state: dict[str, torch.Tensor], alpha: int, r: int) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict with every adapter merged into its base weight
    (W + B A alpha/r) and the plain model's key names, so the export is an ordinary checkpoint.
    Works on a gathered state dict, which is what ZeRO-3 gives."""
    prefix = "base_model.model."
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix(prefix)
        if ".base_layer." in name:
            module = key[: key.index(".base_layer.")]
            if name.endswith(".weight"):
                a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
                value = (value.float() + (b.float() @ a.float()) * (alpha / r)).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        merged[name] = value
    return merged


class AudioLM(torch.nn.Module):
    """The HF model (or its LoRA wrapper) with the training forward pass: packed rows in, logits out."""

    def __init__(
        self,
        model,
        family: Family,
        feature_extractor,
        audio_token_id: int,
        cache: AudioEncoderCache | None,
        distributed: bool,
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.feature_extractor = feature_extractor
        self.audio_token_id = audio_token_id
        self.cache = cache
        self.distributed = distributed

    @property
    def hf(self):
        """The family's transformers model inside (under the LoRA wrapper, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def train(self, mode: bool = True):
        super().train(mode)
        encoder = [
            p for name, p in self.hf.named_parameters() if part_of(self.family, name) == "audio_encoder"
        ]
        if not any(p.requires_grad for p in encoder):
            # A frozen encoder is a fixed function: no dropout, so its outputs can be cached. (A
            # projector inside the tower's module has no dropout of its own to lose.)
            self.family.audio_tower(self.hf).eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.family.lm_head(self.hf).weight.device

    def run_encoder(self, chunks: list[np.ndarray]) -> list[torch.Tensor]:
        """The audio encoder on a batch of chunks (the waveforms as vLLM prepares them: SFTDataset
        applies the family's serving_audio): each chunk's output over its real frames, from
        features as the family's processor makes them."""
        features, mask = self.family.features(self.feature_extractor, chunks)
        return self.family.encode(self.hf, features.to(self.device), mask.to(self.device))

    def encode(self, chunks: list[np.ndarray], keys: list[str]) -> list[torch.Tensor]:
        """Encoder outputs of the chunks. Cached ones come from the cache; a frozen encoder runs on
        each missing chunk alone, so a cached value is the same bits whatever batch first computed it."""
        if self.cache is None:
            return self.run_encoder(chunks)
        device = self.device
        out = []
        for chunk, key in zip(chunks, keys, strict=True):
            value = self.cache.get(key)
            if value is None:
                with torch.no_grad():
                    value = self.run_encoder([chunk])[0]
                self.cache.put(key, value)
            out.append(value.to(device))
        return out

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        audio: list[np.ndarray],
        audio_keys: list[str],
    ) -> torch.Tensor:
        """The language model's last hidden states for packed (or padded) rows."""
        hf, family = self.hf, self.family
        embeds = hf.get_input_embeddings()(input_ids)
        if audio:
            projected = family.project(hf, torch.cat(self.encode(audio, audio_keys)))
            slots = (input_ids == self.audio_token_id).unsqueeze(-1)
            if int(slots.sum()) != projected.shape[0]:
                raise ValueError(
                    f"{int(slots.sum())} audio placeholders but {projected.shape[0]} audio frames"
                )
            embeds = embeds.masked_scatter(slots, projected.to(embeds.dtype))
        elif self.distributed:
            # A rank whose batch has no audio must still use the audio modules: ZeRO-3 gathers
            # their weights collectively, and ZeRO-1/2 reduce gradients in buckets that every
            # rank fills with the same parameters. A silent clip, weighted 0, does both.
            silent = [np.zeros(self.feature_extractor.sampling_rate // 10, dtype=np.float32)]
            dummy = family.project(hf, self.run_encoder(silent)[0])
            embeds = embeds + 0.0 * dummy.sum()
        return family.decoder(hf)(
            inputs_embeds=embeds,
            position_ids=family.position_ids(position_ids),
            attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state

    def logits(self, *inputs) -> torch.Tensor:
        """Logits at every position (for checks; training computes them only where there is a target)."""
        return self.family.lm_head(self.hf)(self.hidden_states(*inputs))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        audio: list[np.ndarray],
        audio_keys: list[str],
        labels: torch.Tensor,
        weights: torch.Tensor,
        row_weights: torch.Tensor,
        normalizer: float | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's training loss (loss.weighted_loss); with a `temperature`, instead the
        log-probability of every target token (loss.token_logprobs, what RL's loss is made of).
        Both go through here, the module DeepSpeed wraps: ZeRO-3 gathers weights in its forward."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, audio, audio_keys)
        head = self.family.lm_head(self.hf)
        if temperature is not None:
            return token_logprobs(hidden, head, labels, temperature)
        return weighted_loss(hidden, head, labels, weights, row_weights, normalizer)


def attention_implementation(tcfg: TrainConfig, cuda: bool) -> str:
    """train.attn_implementation with "auto" resolved: flash-attention 2 on GPU when installed."""
    if tcfg.attn_implementation != "auto":
        return tcfg.attn_implementation
    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def use_packing(tcfg: TrainConfig, attention: str) -> bool:
    """train.packing, or by default: pack where attention is varlen (flash-attention), since a
    packed row under a block-diagonal mask costs attention over the whole row."""
    return tcfg.packing if tcfg.packing is not None else attention.startswith("flash_attention")


def build_model(
    model_dir: str, processor, tcfg: TrainConfig, world: int = 1, attention: str = "sdpa"
) -> AudioLM:
    """The model to train: loaded in float32 (mixed precision casts on the fly), parts frozen as
    configured, LoRA and gradient checkpointing when asked, and the encoder cache when it applies."""
    family = family_of(model_dir)
    model = family.load_for_training(model_dir, torch.float32, attention)
    set_trainable(model, family, tcfg)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tcfg.lora.enabled:
        model = add_lora(model, family, tcfg)
    cache = None
    # Not under ZeRO-3: a rank whose clips all hit the cache would skip the encoder that the
    # other ranks gather collectively.
    if tcfg.audio_encoder_cache_mb > 0 and not tcfg.trainable.audio_encoder and tcfg.zero_stage != 3:
        cache = AudioEncoderCache(tcfg.audio_encoder_cache_mb)
    audio_token_id = processor.tokenizer.convert_tokens_to_ids(family.audio_token(processor))
    return AudioLM(model, family, processor.feature_extractor, audio_token_id, cache, distributed=world > 1)
