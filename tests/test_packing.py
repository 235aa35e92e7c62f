"""Batch plans, packing, and the training forward pass on the tiny model (frozen parts, LoRA)."""

import pytest
import torch

from data_pipelines.audio import AudioPolicy
from data_pipelines.audio_cache import AudioCache
from data_pipelines.synthetic import generate_split
from distill.filter.cold_start import cold_start_rows
from distill.models.qwen2_audio import Qwen2Audio
from distill.models.tokens import load_tokenizer
from distill.training.config import LoraConfig, TrainConfig
from distill.training.loss import step_normalizer
from distill.training.model import AudioLM, build_model, merged_state_dict
from distill.training.packing import (
    IGNORE,
    Sample,
    collate,
    pack_rows,
    pad_plan,
    plan_epoch,
    rank_batches,
)
from distill.training.sft_data import SFTDataset


def test_plan_covers_every_sample_once_and_is_fixed_by_seed_and_epoch():
    lengths = [10 + (i * 37) % 300 for i in range(200)]
    plan = plan_epoch(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in plan for i in b) == list(range(200))
    assert plan == plan_epoch(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert plan != plan_epoch(lengths, 8, seed=1, epoch=1, group_by_length=True)

    def padded(p):  # token positions a padded batch computes
        return sum(len(b) * max(lengths[i] for i in b) for b in p)

    random_order = plan_epoch(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert padded(plan) < 0.75 * padded(random_order)


def test_ranks_get_disjoint_equal_whole_steps():
    padded = pad_plan([[i] for i in range(23)], world=2, grad_accum=2)
    shares = [rank_batches(padded, r, 2) for r in range(2)]
    # 23 batches topped up to 24 (whole steps of 2 on 2 ranks) with the first batch again.
    assert [len(s) for s in shares] == [12, 12]
    assert sorted(b[0] for s in shares for b in s) == sorted([*range(23), 0])
    assert rank_batches(pad_plan([[0]], 2, 1), 1, 2) == [[0]]  # one batch still trains both ranks


def test_step_normalizer_divides_by_the_whole_steps_target_weight():
    """A step of 2 ranks x 2 micro batches: each micro batch's loss is divided by the weight of all
    four (x 4, as accelerate averages over accumulation and ranks), whatever its own batch holds."""
    padded = [[0, 1], [2], [3], [4, 5], [6], [7]]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert step_normalizer(padded, weights, 0, world=2, grad_accum=2) == (1 + 2 + 3 + 4 + 5 + 6) / 4
    assert step_normalizer(padded, weights, 1, world=2, grad_accum=2) == (7 + 8) / 4


def test_pack_rows_respects_capacity_and_places_everything():
    lengths = [700, 300, 300, 250, 200, 100, 60]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for r in rows for i in r) == list(range(7))
    loads = sorted(sum(lengths[i] for i in r) for r in rows)
    assert loads == [950, 960]  # two rows, as even as the lengths allow (first fit would give 1000 + 910)
    with pytest.raises(ValueError, match="1100 tokens does not fit"):
        pack_rows([1100], 1024)


def test_collate_packs_with_positions_reset_and_no_target_across_samples():
    a = Sample([1, 2, 3], [IGNORE, 2, 3], [0.0, 1.0, 1.0], 1.0, [], [])
    b = Sample([4, 5], [4, 5], [1.0, 1.0], 0.5, [], [])  # a first-token target must not leak from `a`
    batch = collate([a, b], pad_id=0, packing=True, capacity=8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert batch["row_weights"].tolist() == [[1.0, 1.0, 1.0, 0.5, 0.5]]
    assert batch["attention_mask"] is None and batch["tokens"] == batch["positions"] == 5
    assert collate([a, b], 0, packing=True, capacity=4)["input_ids"].shape == (2, 3)  # rows of <= 4
    assert collate([a, b], 0, packing=True, capacity=None)["input_ids"].shape == (1, 5)  # flash: one row
    padded = collate([a, b], pad_id=0, packing=False, capacity=8)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and padded["positions"] == 6


@pytest.fixture(scope="module")
def sft(tiny_model, tmp_path_factory):
    from transformers import AutoProcessor

    tmp = tmp_path_factory.mktemp("sft")
    processor = AutoProcessor.from_pretrained(tiny_model)
    items = generate_split(tmp, "train", ["pitch_level", "higher_of_two"], 4, 0, 1, 16000)
    cache = AudioCache(tmp / "cache", AudioPolicy())
    rows = cold_start_rows(items, load_tokenizer(str(tiny_model)), "sys", cache)
    rows[1]["completion"] = "<think>\nA longer trace: the pitch rises, then a steady tone.\n</think>\nhigh"
    rows[2]["weight"] = 0.25
    # A text-only row (text chain of thought from a mix) packed beside audio rows.
    rows.append(
        {
            "id": "text",
            "audio": None,
            "prompt": rows[0]["prompt"].split("<|audio_bos|>")[0] + "Say hi.",
            "completion": "<think>\nGreeting.\n</think>\nhi",
        }
    )
    return processor, SFTDataset(rows, processor, cache, 1024, 2.0, "<think>\n")


def audio_lm(tiny_model, processor, cache_mb=0, **train):
    tcfg = TrainConfig(audio_encoder_cache_mb=cache_mb, **train)
    return build_model(str(tiny_model), processor, tcfg).eval()


def loss_of(model: AudioLM, batch, normalizer=None) -> torch.Tensor:
    return model(
        batch["input_ids"],
        batch["position_ids"],
        batch["attention_mask"],
        batch["audio"],
        batch["audio_keys"],
        batch["labels"],
        batch["weights"],
        batch["row_weights"],
        normalizer,
    )


def test_training_forward_matches_the_models_own_forward(tiny_model, sft):
    """The embedding path of AudioLM (encoder, projector, placeholders) computes what
    Qwen2AudioForConditionalGeneration.forward computes from the processor's output."""
    processor, ds = sft
    model = audio_lm(tiny_model, processor)
    row = ds.rows[0]
    enc = processor(
        text=[row["prompt"] + "<think>\n"], audio=ds.chunks(row), sampling_rate=16000, return_tensors="pt"
    )
    sample = ds[0]
    n = enc["input_ids"].shape[1]
    assert sample.input_ids[:n] == enc["input_ids"][0].tolist()
    with torch.no_grad():
        theirs = model.hf(**enc).logits
        ours = model.logits(
            torch.tensor([sample.input_ids]),
            torch.arange(len(sample.input_ids))[None],
            None,
            sample.audio,
            sample.audio_keys,
        )
    assert torch.allclose(ours[0, :n], theirs[0], atol=1e-5)


@pytest.mark.parametrize(("cache_mb", "capacity"), [(0, 1024), (64, 1024), (0, 300)])
def test_packed_loss_equals_unpacked_loss(tiny_model, sft, cache_mb, capacity):
    """Same samples, packed (attention kept within each sample; in one row, or several rows of at
    most 300 tokens) or padded one per row: the same loss, with audio, a text-only row, a
    down-weighted row and answer weights."""
    processor, ds = sft
    model = audio_lm(tiny_model, processor, cache_mb)
    samples = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        packed_batch = collate(samples, processor.tokenizer.pad_token_id, packing=True, capacity=capacity)
        padded_batch = collate(samples, processor.tokenizer.pad_token_id, packing=False, capacity=capacity)
        assert (packed_batch["input_ids"].shape[0] > 1) == (capacity == 300)
        assert padded_batch["input_ids"].shape[0] == len(samples)
        packed, padded = loss_of(model, packed_batch), loss_of(model, padded_batch)
        padded_again = loss_of(model, padded_batch)
    assert torch.isclose(packed, padded, rtol=1e-5), (packed, padded)
    if cache_mb:
        # Each of the 4 clips is encoded once; the second and third passes reuse them, to the bit.
        assert (model.cache.misses, model.cache.hits) == (4, 8) and torch.equal(padded, padded_again)


def test_accumulated_micro_batches_equal_one_big_batch(tiny_model, sft):
    """With the step normalizer, the gradients of micro batches summed over accumulation steps
    equal the gradient of all their samples in one batch (a token weighs the same whatever it is
    batched with)."""
    processor, ds = sft
    model = audio_lm(tiny_model, processor, 64)
    pad = processor.tokenizer.pad_token_id
    plan = [[0, 1, 2], [3, 4]]
    grads = []
    for split in (plan, [[0, 1, 2, 3, 4]]):
        model.zero_grad()
        for b in split:
            norm = step_normalizer(split, ds.target_weights, 0, world=1, grad_accum=len(split))
            (loss_of(model, collate([ds[i] for i in b], pad, True, 1024), norm) / len(split)).backward()
        grads.append(model.hf.lm_head.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_contaminated_packing_would_change_the_loss(tiny_model, sft):
    """Guard on the test above: the same packed row with positions running on (one long sequence,
    samples attending to earlier ones) gives another loss."""
    processor, ds = sft
    model = audio_lm(tiny_model, processor)
    batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id, packing=True, capacity=1024)
    with torch.no_grad():
        right = loss_of(model, batch)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        wrong = loss_of(model, batch)
    assert not torch.isclose(right, wrong, rtol=1e-4)


def test_frozen_parts_stay_unchanged_and_the_rest_trains(tiny_model, sft):
    """Encoder cache off and weight decay on, so only requires_grad keeps the encoder unchanged."""
    processor, ds = sft
    model = audio_lm(tiny_model, processor, 0).train()
    assert all(not p.requires_grad for p in model.hf.model.audio_tower.parameters())
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    batch = collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id, True, 1024)
    for _ in range(2):
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.hf.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        frozen = key.startswith(Qwen2Audio.parts["audio_encoder"])
        assert changed != frozen or "embed_positions" in key, key  # fixed sinusoids never change
    assert not model.hf.model.audio_tower.training  # a frozen encoder runs without dropout


def test_lora_wraps_only_the_language_model_and_merges_like_peft(tiny_model, sft):
    processor, ds = sft
    model = audio_lm(tiny_model, processor, lora=LoraConfig(enabled=True, r=4, alpha=8))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.model.named_parameters() if ".lora_A." in n}
    assert wrapped and all(".language_model." in n for n in wrapped)
    assert len(wrapped) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)  # the adapter still trains
    with torch.no_grad():  # adapters start at zero (B = 0): give them weight so the merge matters
        for name, p in model.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    merged = merged_state_dict(model.model.state_dict(), alpha=8, r=4)
    batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id, True, 1024)
    with torch.no_grad():
        with_adapters = loss_of(model, batch)
        reference = model.model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in merged)
    plain = audio_lm(tiny_model, processor)
    plain.hf.load_state_dict(merged)
    with torch.no_grad():
        assert torch.isclose(loss_of(plain, batch), with_adapters, rtol=1e-5)


@pytest.mark.e2e  # a minute or more on 2 CPU cores
def test_a_16k_token_trace_trains_with_gradient_checkpointing(tiny_model, sft):
    """Long traces: a completion of over 16k tokens tokenizes, packs, and runs forward and
    backward with gradient checkpointing (activations recomputed layer by layer)."""
    processor, ds = sft
    row = {**ds.rows[0], "completion": "<think>\n" + "the pitch holds steady " * 4200 + "\n</think>\nhigh"}
    long = SFTDataset([row], processor, ds.cache, 20000, 1.0, "<think>\n")
    assert long.lengths[0] > 16384
    batch = collate([long[0]], processor.tokenizer.pad_token_id, packing=True, capacity=20000)
    model = audio_lm(tiny_model, processor, gradient_checkpointing=True).train()
    assert model.hf.is_gradient_checkpointing
    loss = loss_of(model, batch)
    loss.backward()
    grad = model.hf.lm_head.weight.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0


def test_packing_by_default_only_where_attention_is_varlen(monkeypatch):
    from distill.training import model as train_model

    auto = TrainConfig()
    assert train_model.attention_implementation(auto, cuda=False) == "sdpa"
    monkeypatch.setattr(train_model.importlib.util, "find_spec", lambda name: object())
    assert train_model.attention_implementation(auto, cuda=True) == "flash_attention_2"
    assert train_model.use_packing(auto, "flash_attention_2") and not train_model.use_packing(auto, "sdpa")
    assert train_model.use_packing(TrainConfig(packing=True), "sdpa")
    assert not train_model.use_packing(TrainConfig(packing=False), "flash_attention_2")


def test_rank_plan_keeps_each_clip_on_one_rank_with_even_tokens():
    """train.rank_by_clip: every clip's rows train on one rank (its encoder cache then computes the
    clip once), every row trains, the ranks' token counts stay even, and the plan is the same for
    the same (seed, epoch); one process gets the round-robin plan unchanged."""
    import numpy as np

    from distill.training.packing import plan_ranks

    rng = np.random.default_rng(0)
    clips = [f"clip{i // 4}" for i in range(64)] + [None] * 6  # 16 clips x 4 traces, 6 text-only rows
    lengths = [int(x) for x in rng.integers(50, 400, len(clips))]
    one = plan_ranks(lengths, clips, 4, 0, 0, True, 1, 1)
    assert one == pad_plan(plan_epoch(lengths, 4, 0, 0, True), 1, 1)
    plan = plan_ranks(lengths, clips, 4, 0, 0, True, 2, 2)
    assert (
        plan
        == plan_ranks(lengths, clips, 4, 0, 0, True, 2, 2)
        != plan_ranks(lengths, clips, 4, 0, 1, True, 2, 2)
    )
    assert len(plan) % (2 * 2) == 0
    ranks = [rank_batches(plan, r, 2) for r in range(2)]
    rows = [{i for b in batches for i in b} for batches in ranks]
    assert rows[0] | rows[1] == set(range(len(clips))) and not rows[0] & rows[1]
    for clip in {c for c in clips if c}:
        assert len({r for r in range(2) for i in rows[r] if clips[i] == clip}) == 1
    # Every epoch gives each rank the same rows in as many steps (resuming mid-run counts on it),
    # also where clips tie in tokens (as one-trace clips of one template often do).
    for lens in (lengths, [100] * len(clips)):
        first, later = (
            plan_ranks(lens, clips, 4, 0, 0, True, 2, 2),
            plan_ranks(lens, clips, 4, 0, 3, True, 2, 2),
        )
        assert len(later) == len(first)
        assert [{i for b in rank_batches(later, r, 2) for i in b} for r in range(2)] == [
            {i for b in rank_batches(first, r, 2) for i in b} for r in range(2)
        ]
    tokens = [sum(lengths[i] for i in r) for r in rows]
    assert abs(tokens[0] - tokens[1]) <= max(
        sum(lengths[i] for i in range(k, k + 4)) for k in range(0, 64, 4)
    )
    # Fewer clips than ranks: the round-robin plan, so no rank is left without work.
    assert plan_ranks(lengths[:4], ["a"] * 4, 2, 0, 0, True, 2, 1) == pad_plan(
        plan_epoch(lengths[:4], 2, 0, 0, True), 2, 1
    )
