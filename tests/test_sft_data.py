import numpy as np
import torch

from data_pipelines.audio import AudioPolicy, write_wav
from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item
from data_pipelines.synthetic import generate_split
from distill.filter.cold_start import cold_start_rows
from distill.models.tokens import load_tokenizer
from distill.training.loss import weighted_loss
from distill.training.packing import IGNORE, collate
from distill.training.sft_data import SFTDataset, split_prefix


def IDENTITY(x):  # the tests' inputs are already logits
    return x


def per_token(row_weights: list[float], length: int) -> torch.Tensor:
    """Row weights as collate lays them out: each row's weight on every one of its tokens."""
    return torch.tensor(row_weights)[:, None].expand(-1, length)


def test_split_prefix_moves_prefill_into_prompt():
    assert split_prefix("P", "<think>\nx</think>a", "<think>\n") == ("P<think>\n", "x</think>a")
    assert split_prefix("P", "x</think>a", "<think>\n") == ("P", "x</think>a")
    assert split_prefix("P", "<think>\nx", "") == ("P", "<think>\nx")


def test_dataset_masks_prompt_and_weights_answer(tiny_model, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    items = generate_split(tmp_path, "train", ["pitch_level"], 2, 0, 1, 16000)
    cache = AudioCache(tmp_path / "cache", AudioPolicy())
    rows = cold_start_rows(items, load_tokenizer(str(tiny_model)), "sys", cache)
    ds = SFTDataset(
        rows, processor, cache, max_seq_len=1024, answer_loss_weight=3.0, generation_prefix="<think>\n"
    )
    ex = ds[0]
    tok = processor.tokenizer
    ids, labels, weights = (torch.tensor(x) for x in (ex.input_ids, ex.labels, ex.weights))
    assert ds.lengths[0] == len(ids)
    targets = labels[labels != IGNORE].tolist()
    # The loss covers exactly the generated part: reasoning, </think>, answer, end of turn.
    assert tok.decode(targets) == rows[0]["completion"].removeprefix("<think>\n") + tok.eos_token
    n_audio = int((ids == tok.convert_tokens_to_ids("<|AUDIO|>")).sum())
    frames = len(ex.audio[0]) // 160  # 100 mel frames a second
    assert n_audio == (((frames - 1) // 2 + 1) - 2) // 2 + 1  # Qwen2-Audio's conv + pooling strides
    assert ex.audio_keys == [f"{cache.load(rows[0]['audio'])[1]}#0"]  # keyed by content
    close = tok.convert_tokens_to_ids("</think>")
    after = (ids == close).nonzero()[0].item() + 1
    assert set(weights[after:].tolist()) == {3.0}
    assert set(weights[:after][labels[:after] != IGNORE].tolist()) == {1.0}
    rows[1]["weight"] = 0.25  # a trace of an item answerable from text, down-weighted by the filter
    batch = collate([ds[0], ds[1]], tok.pad_token_id, packing=False, capacity=1024)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["weights"].shape
    assert batch["row_weights"][:, 0].tolist() == [1.0, 0.25]
    assert len(batch["audio"]) == 2


def test_weighted_loss_ignores_masked_and_weighs_tokens():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 1] = 5.0  # predicts label[1]=1 well
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE]])
    uniform = weighted_loss(logits, IDENTITY, labels, torch.ones(1, 4))
    ce_good = torch.nn.functional.cross_entropy(logits[0, 0:1], torch.tensor([1]))
    ce_flat = torch.nn.functional.cross_entropy(logits[0, 1:2], torch.tensor([2]))
    assert torch.isclose(uniform, (ce_good + ce_flat) / 2)
    heavy = weighted_loss(logits, IDENTITY, labels, torch.tensor([[1.0, 1.0, 3.0, 1.0]]))
    assert torch.isclose(heavy, (ce_good + 3 * ce_flat) / 4)


def test_load_rows_refuses_a_bad_weight_naming_file_and_line(tmp_path):
    import pytest

    from distill.core.files import atomic_write_jsonl
    from distill.training.sft_data import load_rows

    path = tmp_path / "rows.jsonl"
    row = {"audio": "a.wav", "prompt": "p", "completion": "c"}
    atomic_write_jsonl(path, [row, {**row, "weight": 0.5}, {**row, "weight": 2}])
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: SFT row weight 2"):
        load_rows([path])


def test_row_weight_scales_the_loss_of_its_row_only():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, 4, 0, IGNORE]])
    weights = torch.ones(2, 4)
    full = weighted_loss(logits, IDENTITY, labels, weights)
    # A batch of down-weighted rows is not renormalized back to full strength ...
    assert torch.isclose(
        weighted_loss(logits, IDENTITY, labels, weights, per_token([0.25, 0.25], 4)), 0.25 * full
    )
    # ... and a zero-weight row contributes nothing to the gradient.
    logits.requires_grad_(True)
    weighted_loss(logits, IDENTITY, labels, weights, per_token([1.0, 0.0], 4)).backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_dataset_refuses_audio_placeholder_in_completion(tiny_model, tmp_path):
    import pytest
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    items = generate_split(tmp_path, "train", ["pitch_level"], 1, 0, 1, 16000)
    cache = AudioCache(None, AudioPolicy())
    rows = cold_start_rows(items, load_tokenizer(str(tiny_model)), "sys", cache)
    rows[0]["completion"] = "<think>\nx<|AUDIO|>\n</think>\nhigh"
    with pytest.raises(ValueError, match="contains the audio placeholder"):
        SFTDataset(rows, processor, cache, 1024, 1.0, "<think>\n")


def test_long_audio_is_chunked_into_one_placeholder_per_chunk(tiny_model, tmp_path):
    """data.audio.long_audio=chunk: 55 s of audio becomes 3 audio inputs of at most 25 s (18.3 s
    each), each with its own placeholder in the prompt and its own row of features, in order."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    rate = 16000
    steps = np.concatenate([np.full(18 * rate, 0.1), np.full(19 * rate, 0.2), np.full(18 * rate, 0.3)])
    write_wav(tmp_path / "long.wav", steps.astype(np.float32), rate)
    item = Item(id="long", audio=str(tmp_path / "long.wav"), question="q?", answer="a")
    cache = AudioCache(tmp_path / "cache", AudioPolicy(long_audio="chunk", chunk_seconds=25, max_chunks=3))
    chunks = cache.chunks(item.audio)
    assert [len(c) for c in chunks] == [293334, 293333, 293333]
    assert [round(float(np.median(c)), 2) for c in chunks] == [0.1, 0.2, 0.3]
    rows = cold_start_rows([item], load_tokenizer(str(tiny_model)), "sys", cache)
    assert rows[0]["prompt"].count("<|AUDIO|>") == 3 and "Audio 3:" in rows[0]["prompt"]
    ex = SFTDataset(rows, processor, cache, 4096, 1.0, "<think>\n")[0]
    assert len(ex.audio) == 3 and ex.audio_keys[2].endswith("#2")
    # Each chunk is its own audio input: 1834 mel frames -> 458 placeholder tokens.
    assert ex.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")) == 3 * 458
    batch = collate([ex, ex], processor.tokenizer.pad_token_id, packing=True, capacity=4096)
    assert len(batch["audio"]) == 6


def test_a_row_training_cannot_take_is_named_by_file_and_line(tiny_model, tmp_path):
    import pytest
    from transformers import AutoProcessor

    from distill.core.files import atomic_write_jsonl
    from distill.training.sft_data import load_rows

    processor = AutoProcessor.from_pretrained(tiny_model)
    items = generate_split(tmp_path, "train", ["pitch_level"], 2, 0, 1, 16000)
    cache = AudioCache(None, AudioPolicy())
    rows = cold_start_rows(items, load_tokenizer(str(tiny_model)), "sys", cache)
    rows[1]["completion"] = "<think>\n" + "steady tone " * 200 + "\n</think>\nhigh"
    atomic_write_jsonl(tmp_path / "kept.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"kept\.jsonl:2: SFT row '.*': \d+ prompt \+ \d+ completion tokens exceed"
    ):
        SFTDataset(load_rows([tmp_path / "kept.jsonl"]), processor, cache, 256, 1.0, "<think>\n")
