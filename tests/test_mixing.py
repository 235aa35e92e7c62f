import json
from collections import Counter

import numpy as np
import pytest

from data_pipelines.audio import AudioPolicy, write_wav
from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item, write_manifest
from data_pipelines.synthetic import generate_split
from distill.config import Config
from distill.models.tokens import load_tokenizer
from distill.training.config import MixSourceConfig
from distill.training.mixing import build_mix, direct_audio_rows, mix_rows, text_cot_rows

AUDIO = "<|AUDIO|>"


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "audio": None, "prompt": "p", "completion": "c"} for i in range(n)]


def _write_lines(path, lines: list) -> None:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )


@pytest.fixture
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_mix_rows_ratios_hold_without_replacement_when_enough():
    traces = _rows("t", 100)
    rows, stats = mix_rows(traces, [("text", _rows("x", 80), 0.5), ("audio", _rows("a", 40), 0.25)], seed=0)
    by_source = Counter(r["source"] for r in rows)
    assert by_source == {"traces": 100, "text": 50, "audio": 25}
    assert stats["total"] == 175
    assert stats["text"] == {"rows": 50, "unique": 50, "share": 50 / 175}
    assert stats["audio"] == {"rows": 25, "unique": 25, "share": 25 / 175}
    # Every trace exactly once; a source with enough rows repeats none.
    assert sorted(r["id"] for r in rows if r["source"] == "traces") == sorted(t["id"] for t in traces)
    assert len({r["id"] for r in rows if r["source"] == "text"}) == 50
    assert "source" not in traces[0]  # the caller's rows are not modified


def test_mix_rows_repeats_a_small_source_evenly():
    rows, stats = mix_rows(_rows("t", 100), [("small", _rows("s", 7), 0.5)], seed=3)
    counts = Counter(r["id"] for r in rows if r["source"] == "small")
    assert sum(counts.values()) == 50 and len(counts) == 7
    assert max(counts.values()) - min(counts.values()) <= 1
    assert stats["small"]["unique"] == 7


def test_mix_rows_is_deterministic_and_depends_on_the_seed():
    def ids(seed):
        rows, _ = mix_rows(_rows("t", 40), [("x", _rows("x", 100), 0.5)], seed)
        return [(r["source"], r["id"]) for r in rows]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)
    # The seed changes which rows are drawn, not only their order.
    assert {i for s, i in ids(1) if s == "x"} != {i for s, i in ids(2) if s == "x"}


def test_mix_rows_refuses_an_empty_source_with_weight():
    with pytest.raises(ValueError, match="mix source empty_one: no rows"):
        mix_rows(_rows("t", 10), [("empty_one", [], 0.5)], seed=0)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('["not", "an", "object"]', "expected a JSON object"),
        ({"question": "q", "answer": "a"}, "field 'reasoning' is missing"),
        (
            {"question": "q", "reasoning": 3, "answer": "a"},
            "field 'reasoning' is missing or not a non-empty string",
        ),
        ({"question": " ", "reasoning": "r", "answer": "a"}, "field 'question' is missing"),
        ({"question": "q", "reasoning": "r <think> r", "answer": "a"}, "field 'reasoning' contains <think>"),
        ({"question": "q", "reasoning": "r </think> a", "answer": "a"}, "field 'reasoning' contains"),
        ({"id": "same", "question": "q", "reasoning": "r", "answer": "a"}, "duplicate id 'same'"),
    ],
)
def test_text_cot_bad_rows_name_file_and_line(tmp_path, tokenizer, bad, reason):
    path = tmp_path / "cot.jsonl"
    _write_lines(path, [{"id": "same", "question": "q", "reasoning": "r", "answer": "a"}, bad])
    with pytest.raises(ValueError, match=rf"cot\.jsonl:2: {reason}"):
        text_cot_rows(path, tokenizer, "sys")


def test_text_cot_rows_are_text_only(tmp_path, tokenizer):
    path = tmp_path / "cot.jsonl"
    _write_lines(
        path,
        [
            {"question": "What is 2+3?", "reasoning": " 2 plus 3 is 5. ", "answer": "5"},
            {"id": "given", "question": "q", "reasoning": "r", "answer": "a"},
        ],
    )
    rows = text_cot_rows(path, tokenizer, "sys")
    assert [r["id"] for r in rows] == ["cot-1", "given"]
    assert rows[0]["audio"] is None and AUDIO not in rows[0]["prompt"]
    assert "What is 2+3?" in rows[0]["prompt"] and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rows[0]["completion"] == "<think>\n2 plus 3 is 5.\n</think>\n5"


def _audio_items(tmp_path) -> list[Item]:
    """Two short synthetic clips and one 55 s clip (three chunks under the chunking policy)."""
    items = generate_split(tmp_path, "train", ["pitch_level"], 2, 0, 1, 16000)
    long = tmp_path / "long.wav"
    write_wav(long, np.full(55 * 16000, 0.1, dtype=np.float32), 16000)
    return [*items, Item(id="long", audio=str(long), question="How loud?", answer="quiet")]


def _chunking_cache(tmp_path) -> AudioCache:
    return AudioCache(tmp_path / "cache", AudioPolicy(long_audio="chunk", chunk_seconds=25, max_chunks=3))


def test_direct_audio_rows_answer_after_an_empty_think_block(tmp_path, tokenizer):
    items = _audio_items(tmp_path)
    write_manifest(tmp_path / "direct.jsonl", items)
    cache = _chunking_cache(tmp_path)
    cfg = Config(run_name="r", output_dir=str(tmp_path / "runs"))
    rows = direct_audio_rows(tmp_path / "direct.jsonl", cfg, tokenizer, cache)
    assert [r["id"] for r in rows] == [it.id for it in items]
    for row, item in zip(rows, items, strict=True):
        assert row["completion"] == f"<think>\n\n</think>\n{item.answer}"
        assert row["prompt"].count(AUDIO) == len(cache.chunks(row["audio"], row["audio_sha256"]))
        assert item.question in row["prompt"]
    assert rows[-1]["prompt"].count(AUDIO) == 3


def test_direct_audio_rows_name_bad_items(tmp_path, tokenizer):
    items = generate_split(tmp_path, "train", ["pitch_level"], 1, 0, 1, 16000)
    path = tmp_path / "direct.jsonl"
    write_manifest(path, items)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "x", "audio": items[0].audio, "question": "q?"}) + "\n")
        handle.write(json.dumps({"id": "y", "audio": "missing.wav", "question": "q?", "answer": "a"}) + "\n")
    cfg = Config(run_name="r", output_dir=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"2 bad item\(s\)") as err:
        direct_audio_rows(path, cfg, tokenizer, AudioCache(None, AudioPolicy()))
    assert f"{path}:2: missing_answer" in str(err.value)
    assert f"{path}:3: missing_file" in str(err.value)


def test_build_mix_reads_each_kind_under_its_name(tmp_path, tokenizer):
    write_manifest(tmp_path / "direct.jsonl", _audio_items(tmp_path))
    _write_lines(
        tmp_path / "cot.jsonl", [{"question": f"q{i}", "reasoning": "r", "answer": "a"} for i in range(5)]
    )
    cfg = Config(run_name="r", output_dir=str(tmp_path / "runs"))
    mix = [
        MixSourceConfig("text_cot", str(tmp_path / "cot.jsonl"), 0.5),
        MixSourceConfig("direct_audio", str(tmp_path / "direct.jsonl"), 0.3),
    ]
    rows, stats = build_mix(_rows("t", 10), mix, cfg, tokenizer, _chunking_cache(tmp_path), seed=0)
    assert Counter(r["source"] for r in rows) == {
        "traces": 10,
        "text_cot:cot.jsonl": 5,
        "direct_audio:direct.jsonl": 3,
    }
    assert stats["total"] == 18
