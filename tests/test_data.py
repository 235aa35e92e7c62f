import json

import numpy as np
import pytest

from data_pipelines.audio import AudioError, AudioPolicy, prepare_audio, write_wav
from data_pipelines.items import Item, ManifestError, read_manifest, write_manifest
from data_pipelines.synthetic import generate_split


def test_generate_split_roundtrips_through_manifest(tmp_path):
    items = generate_split(tmp_path, "train", ["pitch_level", "higher_of_two"], 6, 0, 1, 16000)
    assert [it.family for it in items[:2]] == ["pitch_level", "higher_of_two"]
    write_manifest(tmp_path / "m.jsonl", items)
    line = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert line["schema_version"] == 2 and not line["audio"].startswith("/")
    back = read_manifest(tmp_path / "m.jsonl")
    assert [b.audio for b in back] == [it.audio for it in items]
    assert prepare_audio(back[0].audio, AudioPolicy()).dtype == np.float32


def test_prepare_audio_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([np.ones(8000), np.zeros(8000)], axis=1).astype(np.float32) * 0.5
    write_wav(tmp_path / "s.wav", stereo, 8000)
    mono = prepare_audio(tmp_path / "s.wav", AudioPolicy())
    assert mono.ndim == 1 and abs(len(mono) - 16000) < 10
    assert abs(float(np.median(mono)) - 0.25) < 0.01


def test_prepare_audio_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    with pytest.raises(AudioError, match="bad.wav: cannot decode"):
        prepare_audio(bad, AudioPolicy())


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "a", "audio": "x.wav", "question": "q"}', "no reference answer"),
        (
            '{"id": "a", "audio": "x.wav", "question": "q", "answer": "c", "choices": ["a", "b"]}',
            "not one of the choices",
        ),
        ('{"id": "a", "audio": "x.wav", "question": "q", "answer": "a", "colour": 1}', "unknown field"),
        (
            '{"id": "a", "audio": "x.wav", "question": "q", "answer": "a", "schema_version": 9}',
            "schema_version",
        ),
        ("[1, 2]", "expected a JSON object"),
        (
            '{"id": "a", "audio": "x.wav", "question": "q", "answer": "a", "choices": "abc"}',
            "list of strings",
        ),
        (
            '{"id": "a", "audio": "x.wav", "question": "q", "answer": "a", "reasoning": "no tags"}',
            "'reasoning' must",
        ),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, line, reason):
    (tmp_path / "x.wav").write_bytes(b"")
    good = json.dumps(Item(id="ok", audio="x.wav", question="q", answer="a").to_json())
    path = tmp_path / "m.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=f"m.jsonl:2: .*{reason}"):
        read_manifest(path)


def test_manifest_duplicate_ids(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"")
    good = json.dumps(Item(id="ok", audio="x.wav", question="q", answer="a").to_json())
    path = tmp_path / "m.jsonl"
    path.write_text(good + "\n\n" + good + "\n")
    with pytest.raises(ManifestError, match="m.jsonl:3: duplicate id 'ok' \\(first on line 1\\)"):
        read_manifest(path)
