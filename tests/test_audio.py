"""Audio decoding checks and the content-addressed audio cache."""

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.audio import AudioError, AudioPolicy, prepare_audio, split_chunks, write_wav
from data_pipelines.audio_cache import AudioCache

RATE = 16000


def tone(seconds=1.0, rate=RATE, hz=440.0, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def bad_files(folder: Path) -> dict[str, Path]:
    """One file per audio failure, keyed by the reason validation must give."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["unreadable"] = folder / "garbage.wav"
    files["unreadable"].write_bytes(b"RIFF....not audio at all")
    write_wav(folder / "whole.wav", tone(1.0), RATE)
    data = (folder / "whole.wav").read_bytes()
    files["truncated"] = folder / "cut.wav"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"] = folder / "empty.wav"
    sf.write(files["empty"], np.zeros(0, dtype=np.float32), RATE)
    files["nonfinite"] = folder / "nan.wav"
    wave = tone(0.5)
    wave[100] = np.nan
    sf.write(files["nonfinite"], wave, RATE, subtype="FLOAT")
    files["silent"] = folder / "silence.wav"
    write_wav(files["silent"], np.zeros(RATE, dtype=np.float32), RATE)
    files["low_rate"] = folder / "phone.wav"
    write_wav(files["low_rate"], tone(1.0, rate=4000, hz=300), 4000)
    files["too_long"] = folder / "long.wav"
    write_wav(files["too_long"], tone(3.0, rate=8000), 8000)
    files["missing_file"] = folder / "nowhere.wav"
    return files


POLICY = AudioPolicy(sample_rate=RATE, max_seconds=2.0)


@pytest.mark.parametrize(
    "reason",
    ["unreadable", "truncated", "empty", "nonfinite", "silent", "low_rate", "too_long", "missing_file"],
)
def test_each_bad_file_is_rejected_with_its_reason(tmp_path, reason):
    path = bad_files(tmp_path)[reason]
    with pytest.raises(AudioError) as err:
        prepare_audio(path, POLICY)
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{path}: ")


def test_truncated_ogg_and_flac_are_caught(tmp_path):
    for suffix in ("ogg", "flac"):
        whole = tmp_path / f"x.{suffix}"
        sf.write(whole, tone(1.0), RATE)
        data = whole.read_bytes()
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(AudioError) as err:
            prepare_audio(cut, POLICY)
        assert err.value.reason in ("truncated", "unreadable"), suffix
        assert prepare_audio(whole, POLICY).shape == (RATE,)


def test_stereo_44k_mixes_down_and_resamples(tmp_path):
    left = tone(1.0, rate=44100, hz=300)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    sf.write(tmp_path / "s.flac", stereo, 44100)
    audio = prepare_audio(tmp_path / "s.flac", POLICY)
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - RATE) <= 1
    assert abs(float(np.abs(audio).max()) - 0.25) < 0.01  # (0.5 + 0) / 2
    peak_hz = np.argmax(np.abs(np.fft.rfft(audio))) * RATE / len(audio)
    assert abs(peak_hz - 300) < 2


def test_mp3_decodes(tmp_path):
    sf.write(tmp_path / "x.mp3", tone(1.0), RATE)
    assert abs(len(prepare_audio(tmp_path / "x.mp3", POLICY)) - RATE) < 2000  # mp3 pads its frames


def test_long_audio_policies(tmp_path):
    write_wav(tmp_path / "long.wav", tone(5.0), RATE)
    cut = prepare_audio(tmp_path / "long.wav", AudioPolicy(max_seconds=2.0, long_audio="truncate"))
    assert len(cut) == 2 * RATE
    chunked = AudioPolicy(long_audio="chunk", chunk_seconds=2.0, max_chunks=3)
    whole = prepare_audio(tmp_path / "long.wav", chunked)
    pieces = split_chunks(whole, chunked.chunk_samples())
    assert [len(c) for c in pieces] == [26667, 26667, 26666]  # 5 s in 3 near-equal pieces, no 1 s sliver
    assert np.array_equal(np.concatenate(pieces), whole)
    # A hair over a chunk gives two halves, not a chunk and a sliver the model cannot use.
    assert [len(c) for c in split_chunks(np.zeros(2 * RATE + 10), chunked.chunk_samples())] == [RATE + 5] * 2
    with pytest.raises(AudioError, match="longer than the 4 s allowed") as err:
        prepare_audio(tmp_path / "long.wav", AudioPolicy(long_audio="chunk", chunk_seconds=2.0, max_chunks=2))
    assert err.value.reason == "too_long"


def test_inline_bytes_decode_like_the_file(tmp_path):
    write_wav(tmp_path / "a.wav", tone(0.5), 8000)
    from_file = prepare_audio(tmp_path / "a.wav", POLICY)
    from_bytes = prepare_audio((tmp_path / "a.wav").read_bytes(), POLICY)
    assert np.array_equal(from_file, from_bytes)


def test_cache_decodes_once_and_keys_by_content_and_policy(tmp_path):
    write_wav(tmp_path / "a.wav", tone(1.0, rate=8000), 8000)
    cache = AudioCache(tmp_path / "cache", POLICY)
    first = cache.get(tmp_path / "a.wav")
    again = cache.get(tmp_path / "a.wav")
    assert (cache.misses, cache.hits) == (1, 1) and np.array_equal(first, again)
    assert np.array_equal(first, prepare_audio(tmp_path / "a.wav", POLICY))
    # New bytes at the same path get a new entry, never the stale waveform.
    write_wav(tmp_path / "a.wav", tone(1.0, rate=8000, hz=880), 8000)
    changed = cache.get(tmp_path / "a.wav")
    assert cache.misses == 2 and not np.array_equal(first, changed)
    # Another rate is another entry.
    other = AudioCache(tmp_path / "cache", AudioPolicy(sample_rate=8000))
    assert len(other.get(tmp_path / "a.wav")) == 8000 and other.misses == 1
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3


def test_cache_refuses_a_file_changed_since_validation(tmp_path):
    write_wav(tmp_path / "v.wav", tone(1.0), RATE)
    cache = AudioCache(tmp_path / "cache", POLICY)
    _, sha = cache.load(tmp_path / "v.wav")
    write_wav(tmp_path / "v.wav", tone(2.0), RATE)
    assert len(cache.get(tmp_path / "v.wav", sha)) == RATE  # the validated waveform, by its hash
    cold = AudioCache(tmp_path / "other", POLICY)  # another node, an empty cache
    with pytest.raises(AudioError, match="changed since it was validated") as err:
        cold.get(tmp_path / "v.wav", sha)
    assert err.value.reason == "changed" and not list((tmp_path / "other").rglob("*.npy"))


def test_cache_entries_depend_on_every_check(tmp_path):
    write_wav(tmp_path / "quiet.wav", tone(1.0, amp=5e-5), RATE)
    lax = AudioCache(tmp_path / "cache", AudioPolicy(silence_peak=0.0))
    assert len(lax.get(tmp_path / "quiet.wav")) == RATE
    with pytest.raises(AudioError, match="silence only"):  # the lax entry is not served to a stricter policy
        AudioCache(tmp_path / "cache", AudioPolicy()).get(tmp_path / "quiet.wav")


def test_cache_treats_a_corrupt_entry_as_a_miss(tmp_path):
    write_wav(tmp_path / "a.wav", tone(1.0), RATE)
    cache = AudioCache(tmp_path / "cache", POLICY)
    good = cache.get(tmp_path / "a.wav")
    entry = next((tmp_path / "cache").rglob("*.npy"))
    entry.write_bytes(entry.read_bytes()[:50])
    assert np.array_equal(cache.get(tmp_path / "a.wav"), good) and cache.misses == 2


def _fill(args):
    root, paths, barrier = args
    barrier.wait()  # both writers start together, so they race on every entry
    cache = AudioCache(root, POLICY)
    return [float(cache.get(p).sum()) for p in paths], cache.misses


def test_cache_is_safe_with_two_concurrent_writers(tmp_path):
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i}.wav")
        write_wav(paths[-1], tone(1.0, rate=22050, hz=200 + 10 * i), 22050)
    root = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.map(_fill, [(root, paths, barrier), (root, paths[::-1], barrier)])
    sums_a, misses_a = results[0]
    sums_b, misses_b = results[1]
    assert sums_a == sums_b[::-1]
    assert misses_a + misses_b >= 40  # every entry was written at least once, some by both
    entries = list(root.rglob("*.npy"))
    assert len(entries) == 40 and not list(root.rglob("*.tmp"))
    fresh = AudioCache(root, POLICY)
    for p in paths:
        assert np.array_equal(fresh.get(p), prepare_audio(p, POLICY))
    assert fresh.hits == 40 and fresh.misses == 0
