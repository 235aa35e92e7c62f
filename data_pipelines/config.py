"""The `data` config section: item sources, the built-in synthetic tasks and the audio policy,
with the checks of its own values (distill/config.py assembles the sections)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from distill.core.schema import ConfigError, check_choices, check_non_negative, check_positive

# Item source formats (data_pipelines/readers.py); "auto" tells them by the file name.
FORMATS = ("auto", "jsonl", "mmau", "hf_disk", "parquet")
# "choice": the question lists the options and the item has `choices`; "free": no choice list;
# "mixed": the two alternate by item index within each family.
DIFFICULTIES = (1, 2, 3)
LONG_AUDIO_POLICIES = ("reject", "truncate", "chunk")
# Keys of this section a resumed run may change: how the work is done, not what it produces.
RESUMABLE = ("audio.workers",)


@dataclass
class SyntheticDataConfig:
    families: list[str] = field(default_factory=lambda: ["pitch_level"])
    difficulty: int = 1
    # Difficulty of the cold start's items (0: same as `difficulty`): a curriculum that starts
    # easy and leaves the harder question pool to the rounds.
    cold_start_difficulty: int = 0
    train_items: int = 64
    eval_items: int = 64
    # "choice" (options listed), "free" (open answer) or "mixed" (alternating).
    answer_format: str = "choice"
    seed: int = 0


@dataclass
class SourceConfig:
    """One item source: a distill JSONL manifest, an MMAU-style JSON list, a `datasets`
    save_to_disk folder or a parquet file (data_pipelines/readers.py)."""

    path: str = MISSING
    format: str = "auto"
    # Share of the mix (data.train_mix), relative to the other sources' weights.
    weight: float = 1.0
    # Item field -> column name, for columns the readers' aliases do not know.
    fields: dict[str, str] = field(default_factory=dict)
    # Folder that relative audio paths start from (default: the source's folder).
    audio_root: str = ""


@dataclass
class AudioConfig:
    """What the model accepts as audio; every item is checked against it before any sampling."""

    # Step-Audio serves at most 29.98 s per audio item; the Whisper-style encoders read 30 s
    # (each family's limit: distill/models).
    max_seconds: float = 30.0
    # Longer audio: "reject" it, "truncate" it to max_seconds, or "chunk" it into pieces of
    # chunk_seconds (at most max_chunks), each a separate audio input, as the Step-Audio client does.
    long_audio: str = "reject"
    chunk_seconds: float = 25.0
    max_chunks: int = 4
    min_sample_rate: int = 8000
    # Peak amplitude at or below this counts as silence only (about -80 dBFS).
    silence_peak: float = 1e-4
    # Prepared waveforms by content hash, shared by all stages and processes ("": <run dir>/cache/audio).
    cache_dir: str = ""
    # Threads that decode audio during validation.
    workers: int = 2


@dataclass
class DataConfig:
    # Item sources (any format of data_pipelines/readers.py); empty means: generate synthetic items.
    train_manifest: str = ""
    eval_manifest: str = ""
    # Items whose reference traces the cold start trains on (default: the train items).
    cold_start_manifest: str = ""
    # Several train sources mixed by weight (instead of train_manifest).
    train_mix: list[SourceConfig] = field(default_factory=list)
    # Size of the train mix (0: the largest the sources allow at their weights, without repeats).
    mix_items: int = 0
    # Fail on the first bad item instead of setting bad items aside in data/rejects/.
    strict: bool = False
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    sample_rate: int = 16000
    system_prompt: str = "You are a helpful assistant that listens carefully and reasons about sounds."


def validate(data: DataConfig) -> None:
    """Raise ConfigError for the first bad value of the `data` section."""
    # Imported here: the synthetic families import this module's constants.
    from data_pipelines.synthetic import ANSWER_FORMATS, FAMILIES, family_available

    syn, audio = data.synthetic, data.audio
    check_choices(
        "data.synthetic",
        syn,
        {
            "difficulty": DIFFICULTIES,
            "cold_start_difficulty": (0, *DIFFICULTIES),
            "answer_format": ANSWER_FORMATS,
        },
    )
    check_choices("data.audio", audio, {"long_audio": LONG_AUDIO_POLICIES})
    check_positive("data", data, ("sample_rate",))
    check_positive("data.synthetic", syn, ("train_items", "eval_items"))
    check_positive(
        "data.audio", audio, ("max_seconds", "chunk_seconds", "max_chunks", "min_sample_rate", "workers")
    )
    check_non_negative("data", data, ("mix_items",))
    check_non_negative("data.audio", audio, ("silence_peak",))
    if not syn.families:
        raise ConfigError("data.synthetic.families: give at least one family")
    if data.cold_start_manifest and not (data.train_manifest or data.train_mix):
        raise ConfigError(
            "data.cold_start_manifest: needs data.train_manifest (or data.train_mix) and "
            "data.eval_manifest too"
        )
    if data.train_manifest and data.train_mix:
        raise ConfigError("data.train_manifest and data.train_mix: give one or the other")
    if bool(data.train_manifest or data.train_mix) != bool(data.eval_manifest):
        raise ConfigError(
            "data.train_manifest (or data.train_mix) and data.eval_manifest: give both or neither"
        )
    if data.mix_items and not data.train_mix:
        raise ConfigError("data.mix_items: needs data.train_mix")
    for i, src in enumerate(data.train_mix):
        if src.format not in FORMATS:
            raise ConfigError(
                f"data.train_mix[{i}].format={src.format!r}: must be one of {', '.join(FORMATS)}"
            )
        if src.weight <= 0:
            raise ConfigError(f"data.train_mix[{i}].weight={src.weight!r}: must be positive")
    if audio.long_audio == "chunk" and audio.chunk_seconds > audio.max_seconds:
        raise ConfigError(
            f"data.audio.chunk_seconds={audio.chunk_seconds}: must be at most "
            f"data.audio.max_seconds={audio.max_seconds}"
        )
    for name in syn.families:
        if name not in FAMILIES:
            raise ConfigError(
                f"data.synthetic.families: unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})"
            )
        if not data.train_manifest and not data.train_mix and not family_available(name):
            raise ConfigError(
                f"data.synthetic.families: {name!r} needs espeak-ng, which is not installed "
                "(apt-get install espeak-ng)"
            )
