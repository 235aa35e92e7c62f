"""Benchmark: trained tokens per second of distill's SFT entry point (distill/train.py) against a plain
Hugging Face `Trainer` with a padding collator, in one run, on the same tiny model and the same kept traces.

    .venv/bin/python bench/train_throughput.py [--items 64] [--traces-per-item 4] [--epochs 1] [--repeats 2]
        [--family NAME] [--zero2] [--work DIR] [--out bench/results/train_throughput.json]

Data: the tiny random model of configs/demo_cpu.yaml (model.tiny sizes) of family `--family` and its synthetic
pitch_level items (0.6-1 s tones, about 20 audio tokens each). Each item gets `--traces-per-item` rows
shaped like the kept traces of a round: the item's audio and rendered chat prompt (shared by its traces,
as sft_data.cold_start_rows renders them), completion `<think>\\n{reasoning}\\n</think>\\n{answer}`,
weight 1. Reasoning lengths are long-tailed like sampled traces: lognormal with median 120 tokens and
sigma 0.9 (seed 0), clipped to [20, 600] tokens and to what fits train.max_seq_len beside the prompt
(about 120 tokens). The text is acoustic-sounding sentences, measured in tokens of the model's tokenizer.

Settings, each its own process with the same threads (all cores, split between ranks), the same rows,
the same train section (micro batch 8, learning rate, warmup, clipping, seed, audio encoder frozen) and
the same number of samples (`--epochs`); mid-run checkpoints and wandb are off in all:
- baseline_hf_trainer: `transformers.Trainer`, one process, CPU, the model's own loss from `labels`,
  batches of 8 rows in random order right-padded to the longest row (what most users and frameworks run).
  Rows are tokenized by distill's SFTDataset, so both sides train on identical token sequences.
- hf_trainer_group_by_length (reference): the same Trainer with train_sampling_strategy=group_by_length,
  the one flag a Trainer user has against padding.
- distill_default: `accelerate launch distill/train.py` with its defaults: on CPU (sdpa attention)
  that is padded rows batched by length (train.packing=null picks packing only with flash-attention).
- distill_packed: the same with train.packing=true (samples packed into balanced rows).
- distill_no_encoder_cache: the defaults with train.audio_encoder_cache_mb=0, so the three distill
  settings show how much of the gain is length grouping, the per-clip audio encoder cache and packing.
- distill_zero2 (`--zero2`): 2 ranks of DeepSpeed ZeRO-2 (gloo), each clip's rows on one rank
  (train.rank_by_clip); distill_zero2_round_robin: the same with batches dealt round-robin.
Trained tokens: non-padding token positions (prompt and completion, audio placeholders included) fed
to the model; tokens/s divides them by the training loop's wall time (model load and save excluded).
Padding share: padding positions / all token positions computed. distill's figures come from
OUT/final/train_summary.json ("tokens", "padded_tokens", "seconds"); a train.py that does not report
"padded_tokens" leaves its padding share unknown (null). Settings run round-robin `--repeats` times
and the fastest run of each counts: other load on a small machine slows whatever it overlaps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import Config, load_config, to_yaml
from distill.models.config import TinyModelConfig
from distill.training.launch import train_command, train_env

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.5
CORES = os.cpu_count() or 1
# Reasoning length in tokens: lognormal (median, sigma), clipped to [min, max].
REASONING_MEDIAN, REASONING_SIGMA, REASONING_MIN, REASONING_MAX = 120, 0.9, 20, 600
SENTENCES = [
    "The tone holds a steady pitch near {f} Hz, with a weaker harmonic close to {g} Hz.",
    "Its energy rises over the first {a:.2f} seconds and then the envelope decays slowly.",
    "Comparing the onset with the tail, the level drops by about {d} dB.",
    "A faint band of noise sits underneath, but the fundamental stays clear above it.",
    "Listening again to the middle part, the frequency does not glide; it stays within a few hertz.",
    "The loudness contour is flat, so the timbre comes from the partials rather than the attack.",
    "The spectrum peaks near {f} Hz and the second partial is about {d} dB quieter.",
    "So far the evidence points one way; I will check the pitch once more against the 500 Hz midpoint.",
]
# distill settings: train.* overrides on top of the shared config.
DISTILL_SETTINGS: dict[str, list[str]] = {
    "distill_default": [],
    "distill_packed": ["train.packing=true"],
    "distill_no_encoder_cache": ["train.audio_encoder_cache_mb=0"],
}
ZERO2_SETTING = {
    "distill_zero2": ["train.zero_stage=2", "train.num_processes=2"],
    # The same with batches dealt to the ranks round-robin (before train.rank_by_clip): each rank
    # then meets most clips and encodes them itself.
    "distill_zero2_round_robin": ["train.zero_stage=2", "train.num_processes=2", "train.rank_by_clip=false"],
}


def bench_config(work: Path, items: int, epochs: float, family: str) -> Config:
    """The demo config, pointed at `work`, with the settings every run shares (single process, CPU,
    full precision, no step cap, no mid-run checkpoints, no wandb). 'no' is quoted: YAML reads a bare
    no as false."""
    return load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            f"output_dir={work}",
            "run_name=bench",
            f"model.tiny.family={family}",
            f"data.synthetic.train_items={items}",
            "data.synthetic.eval_items=8",
            f"train.epochs={epochs}",
            "train.max_steps=0",
            "train.save_steps=0",
            "train.device=cpu",
            "train.mixed_precision='no'",
            "train.zero_stage=0",
            "train.num_processes=1",
            "wandb.mode=disabled",
        ],
    )


def reasoning_text(rng: np.random.Generator, target: int, word_tokens) -> str:
    """Acoustic-sounding sentences cut at about `target` tokens (byte-level BPE counts add up per word)."""
    words: list[str] = []
    count = 0
    while count < target:
        sentence = rng.choice(SENTENCES).format(
            f=rng.integers(100, 4000),
            g=rng.integers(100, 4000),
            a=rng.uniform(0.05, 0.8),
            d=rng.integers(1, 20),
        )
        for word in sentence.split():
            words.append(word)
            count += word_tokens(word)
            if count >= target:
                break
    return " ".join(words)


def write_rows(cfg: Config, traces_per_item: int, path: Path) -> dict:
    """Rows like a round's kept traces (module docstring); returns the token-length distribution."""
    from transformers import AutoProcessor

    from distill.core.files import atomic_write_jsonl
    from distill.data import audio_cache, prepare_data
    from distill.filter.cold_start import cold_start_rows
    from distill.training.packing import IGNORE
    from distill.training.sft_data import SFTDataset

    data = prepare_data(cfg, cfg.run_dir / "data")
    clips = audio_cache(cfg)
    processor = AutoProcessor.from_pretrained(cfg.model.path)
    tokenizer = processor.tokenizer
    prefix, max_len = cfg.sample.generation_prefix, cfg.train.max_seq_len

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    word_tokens = cache(lambda word: count(" " + word))
    bases = cold_start_rows(data.train, tokenizer, cfg.data.system_prompt, clips)
    # Each prompt's length in tokens (audio placeholders expanded) bounds its traces' reasoning.
    probe = SFTDataset([{**b, "completion": prefix} for b in bases], processor, clips, max_len, 1.0, prefix)
    # Lengths and texts from separate generators, so the lengths are exactly the seeded lognormal draws.
    targets = iter(
        np.random.default_rng(0).lognormal(
            np.log(REASONING_MEDIAN), REASONING_SIGMA, len(bases) * traces_per_item
        )
    )
    rng = np.random.default_rng(1)
    rows, reasoning_lens = [], []
    for i, (base, item) in enumerate(zip(bases, data.train, strict=True)):
        prompt_len = sum(label == IGNORE for label in probe[i].labels)
        tail = f"\n</think>\n{item.answer}"
        room = max_len - prompt_len - count(tail + tokenizer.eos_token) - 4  # 4: merges at the seams
        for k in range(traces_per_item):
            target = int(np.clip(next(targets), REASONING_MIN, min(REASONING_MAX, room)))
            reasoning = reasoning_text(rng, target, word_tokens)
            completion = f"{prefix}{reasoning}{tail}"
            reasoning_lens.append(count(reasoning))
            rows.append(
                {
                    "id": f"{base['id']}-t{k}",
                    "audio": base["audio"],
                    "audio_sha256": base["audio_sha256"],
                    "prompt": base["prompt"],
                    "completion": completion,
                    "weight": 1.0,
                }
            )
    # Tokenized as training sees them (SFTDataset refuses a row longer than max_seq_len).
    seq_lens = SFTDataset(rows, processor, clips, max_len, 1.0, prefix).lengths
    atomic_write_jsonl(path, rows)

    def pct(values: list[int]) -> dict:
        p10, p50, p90 = np.percentile(values, [10, 50, 90])
        return {
            "p10": round(p10),
            "p50": round(p50),
            "p90": round(p90),
            "max": max(values),
            "mean": round(float(np.mean(values)), 1),
        }

    return {
        "rows": len(rows),
        "items": len(bases),
        "traces_per_item": traces_per_item,
        "reasoning_distribution": f"lognormal(median={REASONING_MEDIAN}, sigma={REASONING_SIGMA}) tokens, "
        f"seed 0, clipped to [{REASONING_MIN}, {REASONING_MAX}] and max_seq_len",
        "reasoning_tokens": pct(reasoning_lens),
        "sequence_tokens": pct(seq_lens),
    }


def run_env(cfg: Config, processes: int) -> dict[str, str]:
    """The launcher's environment, with every core shared out between the processes (as train.py sets
    torch's threads), whatever OMP_NUM_THREADS the caller has."""
    env = train_env(cfg.train)
    env["OMP_NUM_THREADS"] = str(max(1, CORES // processes))
    return env


def run_baseline(cfg: Config, config_path: Path, rows: Path, out: Path, sampling: str) -> dict:
    """The Trainer in a fresh process (like each distill run), via --baseline-worker; `sampling` is
    its train_sampling_strategy ("random": the baseline)."""
    spec = out / "spec.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(
        json.dumps(
            {
                "config": str(config_path),
                "data": str(rows),
                "model": cfg.model.path,
                "out": str(out),
                "sampling": sampling,
            }
        )
    )
    start = time.time()
    subprocess.run(
        [sys.executable, __file__, "--baseline-worker", str(spec)], env=run_env(cfg, 1), check=True
    )
    result = json.loads((out / "result.json").read_text())
    return {**result, "processes": 1, "process_seconds": round(time.time() - start, 1)}


def baseline_worker(spec_path: Path) -> None:
    """Train with a plain transformers.Trainer and a padding collator; write tokens, padding, seconds."""
    import torch
    from transformers import AutoProcessor, Trainer, TrainerCallback, TrainingArguments

    from distill.data import audio_cache
    from distill.models.registry import family_of
    from distill.training.launch import mixed_precision, use_cuda
    from distill.training.packing import IGNORE
    from distill.training.sft_data import SFTDataset, load_rows

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(CORES)
    cfg = load_config(spec["config"])
    tcfg = cfg.train
    # The train section's device and precision, as distill trains (on GPU: bf16 autocast over
    # float32 weights, the Trainer's `bf16=True`).
    cuda, bf16 = use_cuda(tcfg), mixed_precision(tcfg) == "bf16"
    family = family_of(spec["model"])
    processor = AutoProcessor.from_pretrained(spec["model"])
    pad_id, extractor = processor.tokenizer.pad_token_id, processor.feature_extractor
    model = family.load_for_training(spec["model"], torch.float32, "sdpa")
    family.audio_tower(model).requires_grad_(False)
    rows = load_rows([spec["data"]])
    dataset = SFTDataset(
        rows,
        processor,
        audio_cache(cfg),
        tcfg.max_seq_len,
        1.0,
        cfg.sample.generation_prefix,
        partial(family.serving_audio, extractor),
    )

    def collate(batch: list[dict]) -> dict:
        """Right-pad to the batch's longest row; the model computes its loss from labels."""
        longest = max(len(x["input_ids"]) for x in batch)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.stack(
                [torch.nn.functional.pad(x[key], (0, longest - len(x[key])), value=value) for x in batch]
            )

        def frames(key: str) -> torch.Tensor:
            """One audio input of every row, zero-padded to the widest (a processor that pads to the
            longest clip of its call, not to a fixed window, makes rows of other widths)."""
            width = max(x[key].shape[-1] for x in batch)
            return torch.cat([torch.nn.functional.pad(x[key], (0, width - x[key].shape[-1])) for x in batch])

        audio = [key for key in batch[0] if key not in ("input_ids", "labels", "attention_mask")]
        return {
            "input_ids": pad("input_ids", pad_id),
            "labels": pad("labels", IGNORE),
            "attention_mask": pad("attention_mask", 0),
            **{k: frames(k) for k in audio},
        }

    class PlainDataset(torch.utils.data.Dataset):
        """SFTDataset's samples as the model's own inputs, without distill's loss weights."""

        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int) -> dict:
            sample = dataset[i]
            ids = torch.tensor(sample.input_ids)
            # Audio inputs as the model's processor makes them (padded to 30 s per chunk), per row.
            return {
                "input_ids": ids,
                "labels": torch.tensor(sample.labels),
                "attention_mask": torch.ones_like(ids),
                **family.processor_audio_inputs(extractor, sample.audio),
            }

    counts = {"tokens": 0, "padded_tokens": 0, "samples": 0}
    clock: dict[str, float] = {}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["padded_tokens"] += inputs["input_ids"].numel()
            counts["samples"] += len(inputs["input_ids"])
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.time()

        def on_train_end(self, args, state, control, **kwargs):
            clock["seconds"] = time.time() - clock["start"]

    args = TrainingArguments(
        output_dir=str(Path(spec["out"]) / "trainer"),
        use_cpu=not cuda,
        bf16=bf16,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=tcfg.micro_batch_size,
        num_train_epochs=tcfg.epochs,
        learning_rate=tcfg.learning_rate,
        warmup_steps=tcfg.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=tcfg.weight_decay,
        max_grad_norm=tcfg.max_grad_norm,
        seed=tcfg.seed,
        train_sampling_strategy=spec["sampling"],
        remove_unused_columns=False,  # the collator needs the audio features
    )
    trainer = CountingTrainer(
        model=model, args=args, train_dataset=PlainDataset(), data_collator=collate, callbacks=[Clock()]
    )
    trainer.train()
    seconds = clock["seconds"]
    result = {
        **counts,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(counts["tokens"] / seconds, 1),
        "padding_share": round(1 - counts["tokens"] / counts["padded_tokens"], 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result) + "\n")


def run_distill(cfg: Config, config_path: Path, rows: Path, out: Path, overrides: list[str]) -> dict:
    """`accelerate launch distill/train.py` as the loop launches it, with train.* overrides."""
    tcfg = load_config(config_path, overrides).train
    shutil.rmtree(out, ignore_errors=True)  # train.py does nothing when OUT/final exists
    cmd = train_command(tcfg, config_path, [rows], Path(cfg.model.path), out, "train") + overrides
    start = time.time()
    subprocess.run(cmd, env=run_env(cfg, tcfg.num_processes), check=True)
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    padded = summary.get("padded_tokens")
    return {
        "tokens": summary["tokens"],
        "padded_tokens": padded,
        "steps": summary["steps"],
        "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "padding_share": round(1 - summary["tokens"] / padded, 4) if padded else None,
        "processes": tcfg.num_processes,
        "overrides": overrides,
        "encoder_cache": summary.get("encoder_cache"),
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "process_seconds": round(time.time() - start, 1),
    }


def bench(work: Path, args: argparse.Namespace) -> dict:
    """Build the model and rows in `work`, run every setting, and gather the results."""
    from distill.models.registry import build_tiny_model

    cfg = bench_config(work, args.items, args.epochs, args.family)
    if not (Path(cfg.model.path) / "config.json").exists():
        build_tiny_model(cfg.model.path, cfg.model.tiny)
    rows = work / "rows.jsonl"
    data = write_rows(cfg, args.traces_per_item, rows)
    config_path = work / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    runners: dict[str, Callable[[], dict]] = {
        "baseline_hf_trainer": partial(run_baseline, cfg, config_path, rows, work / "baseline", "random"),
        "hf_trainer_group_by_length": partial(
            run_baseline, cfg, config_path, rows, work / "grouped", "group_by_length"
        ),
    }
    for name, overrides in (DISTILL_SETTINGS | (ZERO2_SETTING if args.zero2 else {})).items():
        runners[name] = partial(run_distill, cfg, config_path, rows, work / name, overrides)
    load_before = os.getloadavg()[0]
    # Round-robin, so a burst of other load on the machine hits one repeat of every setting, not one setting.
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            runs[name].append(run())
    settings = {}
    for name, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])  # the least disturbed run
        settings[name] = {**best, "tokens_per_s_runs": [r["tokens_per_s"] for r in results]}
    base = settings["baseline_hf_trainer"]["tokens_per_s"]
    t = cfg.train
    return {
        "bench": "train_throughput",
        "machine": {
            "cores": CORES,
            "platform": f"{platform.machine()}, Python {platform.python_version()}",
            # Other work on the machine slows any setting it overlaps: read the figures with these.
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        },
        "repeats": args.repeats,
        "model": {
            "family": cfg.model.tiny.family,
            "audio_d_model": cfg.model.tiny.audio_d_model,
            "audio_layers": cfg.model.tiny.audio_layers,
            "text_hidden": cfg.model.tiny.text_hidden,
            "text_layers": cfg.model.tiny.text_layers,
        },
        "train": {
            "micro_batch_size": t.micro_batch_size,
            "epochs": t.epochs,
            "learning_rate": t.learning_rate,
            "max_seq_len": t.max_seq_len,
            "audio_encoder": "frozen",
        },
        "data": data,
        "target_ratio": TARGET_RATIO,
        "settings": settings,
        "ratio_vs_baseline": {
            name: round(s["tokens_per_s"] / base, 2)
            for name, s in settings.items()
            if name != "baseline_hf_trainer"
        },
    }


def print_table(result: dict) -> None:
    print(
        f"\n{'setting':34} {'tokens/s':>9} {'ratio':>6} {'padding':>8} {'seconds':>8} {'tokens':>8} "
        f"{'steps':>6}"
    )
    for name, s in result["settings"].items():
        ratio = result["ratio_vs_baseline"].get(name, 1.0)
        pad = "n/a" if s["padding_share"] is None else f"{s['padding_share']:.1%}"
        print(
            f"{name:34} {s['tokens_per_s']:9.0f} {ratio:6.2f} {pad:>8} {s['seconds']:8.1f} {s['tokens']:8d} "
            f"{s['steps']:6d}"
        )
    d = result["data"]
    print(
        f"rows {d['rows']} ({d['items']} items x {d['traces_per_item']}); "
        f"reasoning tokens {d['reasoning_tokens']}; "
        f"target ratio {result['target_ratio']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64, help="synthetic items (audio clips and prompts)")
    ap.add_argument("--traces-per-item", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs of every setting (round-robin); the fastest counts"
    )
    ap.add_argument(
        "--family", default=TinyModelConfig.family, help="model family of the tiny model (distill/models)"
    )
    ap.add_argument("--zero2", action="store_true", help="also time a 2-rank DeepSpeed ZeRO-2 run of distill")
    ap.add_argument(
        "--work", help="work folder (model, data, runs; reused when given); default: a temp folder"
    )
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    ap.add_argument("--baseline-worker", help=argparse.SUPPRESS)  # internal: the baseline's own process
    args = ap.parse_args()
    if args.baseline_worker:
        baseline_worker(Path(args.baseline_worker))
        return
    result = run_and_save(bench, args)
    print_table(result)


def run_and_save(run: Callable[[Path, argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """`run` in args.work (kept, reused) or a temporary folder; its result written to args.out."""
    if args.work:
        result = run(Path(args.work).resolve(), args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(Path(tmp), args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
