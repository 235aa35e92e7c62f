"""Readers of each source format, validation reports, weighted mixing, and `distill data`."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.audio import AudioPolicy, write_wav
from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item, ManifestError, read_manifest
from data_pipelines.readers import read_source
from data_pipelines.sources import MixError, Source, build_split, mix
from data_pipelines.validate import ValidationError, validate_records
from tests.test_audio import bad_files, tone

RATE = 16000


def wav_bytes(seconds=0.5, hz=440.0, rate=RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate, hz), rate, format="WAV")
    return buf.getvalue()


def manifest_line(**fields) -> str:
    return json.dumps({"schema_version": 2, "question": "Is it high?", "answer": "high", **fields})


def cache(tmp_path, **policy) -> AudioCache:
    return AudioCache(tmp_path / "cache", AudioPolicy(max_seconds=2.0, **policy))


def test_jsonl_with_every_kind_of_bad_line(tmp_path):
    """Each validation reason, reported with file, line and reason; the good items go on."""
    bad = bad_files(tmp_path / "audio")
    write_wav(tmp_path / "audio" / "ok.wav", tone(0.5), RATE)
    inline = base64.b64encode(wav_bytes()).decode()
    lines = [
        manifest_line(id="good", audio="audio/ok.wav", choices=["high", "low"]),
        "{not json",
        manifest_line(id="no-answer", audio="audio/ok.wav", answer=""),
        manifest_line(id="wrong-choice", audio="audio/ok.wav", choices=["up", "down"]),
        manifest_line(id="good", audio="audio/ok.wav"),
        manifest_line(id="inline", audio={"data": inline, "format": "wav"}),
        manifest_line(id="bad-b64", audio={"data": "%%%", "format": "wav"}),
        json.dumps({"id": "no-question", "audio": "audio/ok.wav", "answer": "x"}),
        *(
            manifest_line(id=f"bad-{reason}", audio=str(path.relative_to(tmp_path)))
            for reason, path in sorted(bad.items())
        ),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = validate_records(read_source(path), cache(tmp_path), workers=2)
    assert [it.id for it in report.items] == ["good", "inline"]
    got = {(r.where, r.reason) for r in report.rejects}
    expected = {
        (f"{path}:2", "malformed"),
        (f"{path}:3", "missing_answer"),
        (f"{path}:4", "answer_not_in_choices"),
        (f"{path}:5", "duplicate_id"),
        (f"{path}:7", "malformed"),
        (f"{path}:8", "missing_field"),
    }
    for offset, reason in enumerate(sorted(bad)):
        expected.add((f"{path}:{9 + offset}", reason))
    assert got == expected
    assert report.by_reason()["malformed"] == 2 and len(report.rejects) == 6 + len(bad)
    dup = next(r for r in report.rejects if r.reason == "duplicate_id")
    assert f"first at {path}:1" in dup.message
    # Inline audio is written once, content-addressed, and its hash is the item's cache key.
    inline_item = report.items[1]
    assert Path(inline_item.audio).name == f"{inline_item.audio_sha256}.wav"
    assert all(it.audio_sha256 and len(it.audio_sha256) == 64 for it in report.items)
    with pytest.raises(ValidationError, match=f"{len(report.rejects)} bad item"):
        report.raise_if_strict(True, "m.jsonl")


def test_mmau_json_reports_the_line_of_each_object(tmp_path):
    write_wav(tmp_path / "test-mini-audios" / "a.wav", tone(0.5), RATE)
    objs = [
        {
            "id": "m1",
            "audio_id": "./test-mini-audios/a.wav",
            "question": "Which instrument?",
            "choices": ["piano", "violin"],
            "answer": "violin",
            "dataset": "x",
            "task": "music",
            "difficulty": "hard",
            "sub-category": "Instrument Identification",
        },
        {
            "id": "m2",
            "audio_id": "./test-mini-audios/a.wav",
            "question": "Q",
            "choices": ["a", "b"],
            "answer": "c",
            "task": "sound",
        },
        {
            "id": "m3",
            "audio_id": "./test-mini-audios/gone.wav",
            "question": "Q",
            "answer": "a",
            "task": "speech",
        },
    ]
    text = "[\n" + ",\n".join(json.dumps(o, indent=2) for o in objs) + "\n]\n"
    path = tmp_path / "mmau-test-mini.json"
    path.write_text(text)
    report = validate_records(read_source(path), cache(tmp_path))
    (item,) = report.items
    assert (item.id, item.category, item.family, item.difficulty, item.choices) == (
        "m1",
        "music",
        "Instrument Identification",
        3,
        ["piano", "violin"],
    )
    starts = [text.count("\n", 0, text.index(json.dumps(o, indent=2))) + 1 for o in objs]
    assert starts[0] == 2 and item.source == f"{path}:2"
    lines = {r.reason: r.where for r in report.rejects}
    assert lines == {"answer_not_in_choices": f"{path}:{starts[1]}", "missing_file": f"{path}:{starts[2]}"}


def test_mmau_json_with_a_broken_element(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": oops}\n]')
    records = list(read_source(path))
    assert records[1].where == f"{path}:3" and "not valid JSON" in records[1].error


def hf_rows(tmp_path) -> dict:
    return {
        "audio": [
            {"bytes": wav_bytes(hz=300), "path": "a.wav"},
            {"bytes": None, "path": str(tmp_path / "x.flac")},
            {"bytes": b"garbage", "path": "g.wav"},
        ],
        "question": ["Is it low?", "Is it high?", "?"],
        "answer": ["yes", "no", "yes"],
        "options": [["yes", "no"], ["yes", "no"], ["yes", "no"]],
    }


def test_hf_save_to_disk_and_parquet_read_without_torchcodec(tmp_path):
    import datasets

    sf.write(tmp_path / "x.flac", tone(0.5), 22050)
    ds = datasets.Dataset.from_dict(hf_rows(tmp_path)).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    for src in (tmp_path / "hf", tmp_path / "data.parquet"):
        report = validate_records(read_source(src, inline_dir=tmp_path / "inline"), cache(tmp_path))
        assert [it.question for it in report.items] == ["Is it low?", "Is it high?"], src
        assert report.items[0].choices == ["yes", "no"]
        assert report.items[0].id.startswith(f"{src.stem}-") and report.items[0].id.endswith("-0")
        assert [(r.where, r.reason) for r in report.rejects] == [(f"{src}:row 2", "unreadable")]
        assert Path(report.items[0].audio).parent == tmp_path / "inline"


def test_dataset_dict_folder_names_its_splits_and_numeric_ids_are_text(tmp_path):
    import datasets

    sf.write(tmp_path / "x.flac", tone(0.5), 22050)
    ds = datasets.Dataset.from_dict(hf_rows(tmp_path)).cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"test": ds, "train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ManifestError, match="a DatasetDict with splits test, train: give one split's folder"):
        list(read_source(tmp_path / "dd"))
    write_wav(tmp_path / "a.wav", tone(0.5), RATE)
    (tmp_path / "n.jsonl").write_text(
        json.dumps({"id": 7, "audio": "a.wav", "question": "How many?", "answer": 3})
    )
    (item,) = validate_records(read_source(tmp_path / "n.jsonl"), cache(tmp_path)).items
    assert (item.id, item.answer) == ("7", "3")


def test_parquet_with_arrays_and_a_field_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "clip": [{"array": tone(0.5, 8000).tolist(), "sampling_rate": 8000}],
            "prompt_text": ["How many beeps?"],
            "gold": ["3"],
            "uid": ["u1"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    fields = {"audio": "clip", "question": "prompt_text", "answer": "gold"}
    report = validate_records(read_source(tmp_path / "t.parquet", fields=fields), cache(tmp_path))
    (item,) = report.items
    assert (item.id, item.question, item.answer) == ("u1", "How many beeps?", "3")
    assert abs(len(AudioCache(None, AudioPolicy()).get(item.audio)) - 8000) < 2


def test_minified_json_without_ids_bom_and_non_utf8(tmp_path):
    write_wav(tmp_path / "a.wav", tone(0.5), RATE)
    objs = [
        {"audio_id": "a.wav", "question": "q", "answer": "x"},
        {"audio_id": "a.wav", "question": "q2", "answer": "y"},
    ]
    (tmp_path / "one_line.json").write_text(json.dumps(objs), encoding="utf-8-sig")  # a BOM, all on line 1
    report = validate_records(read_source(tmp_path / "one_line.json"), cache(tmp_path))
    assert [it.question for it in report.items] == ["q", "q2"] and not report.rejects
    assert len({it.id for it in report.items}) == 2
    (tmp_path / "m.jsonl").write_bytes(
        manifest_line(id="ok", audio="a.wav").encode()
        + b"\n"
        + '{"id": "caf\u00e9"}'.encode("latin-1")
        + b"\n"
    )
    records = list(read_source(tmp_path / "m.jsonl"))
    assert records[1].where == f"{tmp_path / 'm.jsonl'}:2" and "not UTF-8" in records[1].error


def test_audio_root_and_odd_inline_format(tmp_path):
    write_wav(tmp_path / "clips" / "a.wav", tone(0.5), RATE)
    (tmp_path / "lists").mkdir()
    inline = base64.b64encode(wav_bytes()).decode()
    (tmp_path / "lists" / "m.jsonl").write_text(
        manifest_line(id="a", audio="a.wav")
        + "\n"
        + manifest_line(id="b", audio={"data": inline, "format": "a/b"})
        + "\n"
    )
    report = build_split(
        "x",
        [Source(str(tmp_path / "lists" / "m.jsonl"), audio_root=str(tmp_path / "clips"))],
        cache(tmp_path),
        tmp_path / "data",
    )
    assert [it.id for it in report] == ["a"]
    (reject,) = [json.loads(x) for x in (tmp_path / "data" / "rejects" / "x.jsonl").read_text().splitlines()]
    assert reject["where"].endswith("m.jsonl:2") and "not a file extension" in reject["message"]


def test_unknown_format_and_missing_source(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ManifestError, match="x.csv: cannot tell the format"):
        list(read_source(tmp_path / "x.csv"))
    with pytest.raises(ManifestError, match="nope.jsonl: source does not exist"):
        list(read_source(tmp_path / "nope.jsonl"))


def items(prefix: str, n: int) -> list[Item]:
    return [Item(id=f"{prefix}{i}", audio="a", question="q", answer="a") for i in range(n)]


def test_mix_holds_the_weights():
    a, b = items("a", 100), items("b", 30)
    mixed = mix([a, b], [3.0, 1.0], 80, seed=1, names=["A", "B"])
    assert sum(i.id.startswith("a") for i in mixed) == 60 and sum(i.id.startswith("b") for i in mixed) == 20
    assert len({i.id for i in mixed}) == 80
    assert mixed == mix([a, b], [3.0, 1.0], 80, seed=1, names=["A", "B"])  # deterministic
    # Without a size: as many as the smaller source allows at its weight (30 of b -> 90 of a).
    full = mix([a, b], [3.0, 1.0], 0, seed=1, names=["A", "B"])
    assert len(full) == 120 and sum(i.id.startswith("b") for i in full) == 30
    with pytest.raises(MixError, match="B: the mix needs 50 items at weight 1 but the source has only 30"):
        mix([a, b], [1.0, 1.0], 100, seed=1, names=["A", "B"])


def test_build_split_writes_manifest_rejects_and_stats_once(tmp_path):
    write_wav(tmp_path / "ok.wav", tone(0.5), RATE)
    (tmp_path / "a.jsonl").write_text(
        "\n".join(manifest_line(id=f"a{i}", audio="ok.wav") for i in range(6)) + "\n"
    )
    (tmp_path / "b.jsonl").write_text(
        manifest_line(id="a0", audio="ok.wav")
        + "\n"  # duplicate across sources
        + manifest_line(id="b1", audio="ok.wav")
        + "\n"
        + manifest_line(id="b2", audio="ok.wav")
        + "\n"
    )
    data = tmp_path / "run" / "data"
    sources = [Source(str(tmp_path / "a.jsonl"), weight=2.0), Source(str(tmp_path / "b.jsonl"), weight=1.0)]
    got = build_split("train", sources, cache(tmp_path), data, total=6)
    assert sorted(i.id[0] for i in got) == ["a"] * 4 + ["b"] * 2
    rejects = [json.loads(x) for x in (data / "rejects" / "train.jsonl").read_text().splitlines()]
    assert [(r["where"], r["reason"]) for r in rejects] == [(f"{tmp_path / 'b.jsonl'}:1", "duplicate_id")]
    stats = json.loads((data / "stats" / "train.json").read_text())
    assert [(s["path"], s["mixed_in"]) for s in stats["sources"]] == [
        (str(tmp_path / "a.jsonl"), 4),
        (str(tmp_path / "b.jsonl"), 2),
    ]
    assert read_manifest(data / "train.jsonl") == got
    again = build_split("train", sources, cache(tmp_path), data, total=6)  # resume: read back, no work
    assert again == got
    with pytest.raises(MixError, match="built from other sources or audio settings"):
        build_split("train", sources[:1], cache(tmp_path), data, total=6)
    # An eval item with a train item's audio and question is not held out: rejected.
    (tmp_path / "e.jsonl").write_text(
        manifest_line(id="e1", audio="ok.wav")
        + "\n"
        + manifest_line(id="e2", audio="ok.wav", question="Another question?")
        + "\n"
    )
    evals = build_split("eval", [Source(str(tmp_path / "e.jsonl"))], cache(tmp_path), data, held_out_from=got)
    assert [i.id for i in evals] == ["e2"]
    assert json.loads((data / "rejects" / "eval.jsonl").read_text())["reason"] == "in_train"


def test_cli_data_validate_and_import(tmp_path, capsys):
    from distill.cli import main

    write_wav(tmp_path / "ok.wav", tone(0.5), RATE)
    write_wav(tmp_path / "quiet.wav", np.zeros(RATE, dtype=np.float32), RATE)
    src = tmp_path / "in.json"
    src.write_text(
        json.dumps(
            [
                {"id": "1", "audio_id": "ok.wav", "question": "q", "answer": "a"},
                {"id": "2", "audio_id": "quiet.wav", "question": "q", "answer": "a"},
            ]
        )
    )
    assert main(["data", "validate", str(src)]) == 1
    out = capsys.readouterr().out
    assert f"rejected {src}:1: silent: silence only" in out and "1 items valid, 1 rejected" in out
    assert not (tmp_path / "audio").exists()  # validate writes nothing
    assert main(["data", "import", str(src), str(tmp_path / "out" / "m.jsonl")]) == 0
    (item,) = read_manifest(tmp_path / "out" / "m.jsonl")
    assert item.id == "1" and item.audio == str(tmp_path / "ok.wav") and item.source == f"{src}:1"
    assert json.loads((tmp_path / "out" / "m.rejects.jsonl").read_text())["reason"] == "silent"
    assert main(["data", "import", str(src), str(tmp_path / "s.jsonl"), "--strict"]) == 1
    assert "1 bad item(s) with strict validation" in capsys.readouterr().err
    assert main(["data", "validate", str(src), "data.audio.max_seconds=0.1"]) == 1
    assert f"rejected {src}:1: too_long: 0.50 s is longer than the 0.1 s allowed" in capsys.readouterr().out
    assert main(["data", "validate", str(src), "data.audio.max_seconds=-1"]) == 2
    assert "data.audio.max_seconds=-1.0: must be positive" in capsys.readouterr().err
