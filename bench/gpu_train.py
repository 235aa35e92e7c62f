"""GPU readiness: distill's trainer against a plain Hugging Face `Trainer` on one GPU, on a randomly
initialised model of a real architecture shrunk to about 0.8 billion parameters; one script of about
ten minutes.

    python bench/gpu_train.py [--size 1b|tiny] [--device cuda|cpu] [--items 256] [--traces-per-item 4]
        [--repeats 2] [--peak-tflops F] [--work DIR] [--out bench/results/gpu_train.json]

Needs torch with CUDA, transformers, accelerate, peft and DeepSpeed (`pip install` a wheel brought
along: `pip download deepspeed` where the network is); neither vLLM nor the network.

Model (`--size 1b`): Qwen2-Audio's classes (the real one: text 4096 wide x 32 layers, audio encoder
1280 x 32) shrunk to text 2048 wide x 16 layers (16 heads, 2 KV heads, MLP 5632; 0.7B) and an audio
encoder 768 wide x 12 layers (0.09B), with the tiny tokenizer's 512-token vocabulary, built at random
by distill's own tiny-model builder. `--size tiny`: the CPU demo's model, for the test that keeps this
script working on CPU (`--device cpu`).

Data and settings as `bench/train_throughput.py` (rows shaped like a round's kept traces, reasoning
lengths lognormal with median 120 tokens, micro batch 8, one epoch, audio encoder frozen):
- baseline_hf_trainer: `transformers.Trainer`, bf16 (`bf16=True`), one process, batches in random
  order right-padded to their longest row;
- distill: `accelerate launch distill/train.py`, bf16, DeepSpeed ZeRO-2 on one rank, its defaults
  (length-grouped batches; packing where flash-attention is installed; the per-clip encoder cache).
Reported per setting: trained tokens/s (non-padding positions over the training loop's wall time),
padding share, peak GPU memory (torch.cuda.max_memory_allocated of the training process), and MFU:
6 x trainable parameters x tokens/s over the GPU's peak dense bf16 FLOP/s (`--peak-tflops`, else
from the device name: H100/H200 989, A100 312, L40S 362; the frozen encoder's forward and attention
are left out, so MFU reads low for long sequences). The ratio is distill's tokens/s over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # the bench folder is not a package

from distill.config import load_config, to_yaml
from distill.models.config import TinyModelConfig

SIZES: dict[str, dict[str, int]] = {
    "1b": {
        "audio_d_model": 768,
        "audio_layers": 12,
        "audio_heads": 12,
        "text_hidden": 2048,
        "text_layers": 16,
        "text_heads": 16,
        "text_kv_heads": 2,
        "text_intermediate": 5632,
    },
    "tiny": {},
}
# Peak dense bf16 tensor FLOP/s (without sparsity), by a substring of torch's device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(given: float | None) -> float | None:
    import torch

    if given:
        return given
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def bench_config(work: Path, args: argparse.Namespace):
    """train_throughput's shared settings, on the chosen device, bf16 on GPU, ZeRO-2 on one rank."""
    cfg = tt.bench_config(work, args.items, 1.0, TinyModelConfig.family)  # the demo's family
    gpu = args.device == "cuda"
    overrides = [
        f"train.device={args.device}",
        "train.mixed_precision=" + ("bf16" if gpu else "'no'"),  # quoted: YAML reads a bare no as false
        "train.zero_stage=2",
        "train.num_processes=1",
        *(f"model.tiny.{k}={v}" for k, v in SIZES[args.size].items()),
    ]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "base.yaml"
    path.write_text(to_yaml(cfg))
    return load_config(path, overrides)


def mfu(setting: dict, peak: float | None) -> float | None:
    params = setting.get("trainable_parameters")
    if not peak or not params:
        return None
    return round(6 * params * setting["tokens_per_s"] / (peak * 1e12), 4)


def bench(work: Path, args: argparse.Namespace) -> dict:
    from distill.models.registry import build_tiny_model

    cfg = bench_config(work, args)
    if not (Path(cfg.model.path) / "config.json").exists():
        build_tiny_model(cfg.model.path, cfg.model.tiny)
    rows = work / "rows.jsonl"
    data = tt.write_rows(cfg, args.traces_per_item, rows)
    config_path = work / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    runs: dict[str, list[dict]] = {"baseline_hf_trainer": [], "distill": []}
    for _ in range(args.repeats):  # round-robin: a slow spell hits one repeat of each setting
        runs["baseline_hf_trainer"].append(
            tt.run_baseline(cfg, config_path, rows, work / "baseline", "random")
        )
        runs["distill"].append(tt.run_distill(cfg, config_path, rows, work / "distill", []))
    peak = peak_tflops(args.peak_tflops)
    settings = {}
    for name, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])
        settings[name] = {
            **best,
            "mfu": mfu(best, peak),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in results],
        }
    import torch

    return {
        "bench": "gpu_train",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "model": {
            k: getattr(cfg.model.tiny, k)
            for k in (
                "audio_d_model",
                "audio_layers",
                "text_hidden",
                "text_layers",
                "text_intermediate",
                "vocab_size",
            )
        },
        "peak_tflops": peak,
        "data": data,
        "settings": settings,
        "ratio_vs_baseline": round(
            settings["distill"]["tokens_per_s"] / settings["baseline_hf_trainer"]["tokens_per_s"], 2
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--items", type=int, default=256, help="synthetic items (audio clips and prompts)")
    ap.add_argument("--traces-per-item", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting; the fastest counts")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, for MFU")
    ap.add_argument(
        "--work", help="work folder (model, data, runs; reused when given); default: a temp folder"
    )
    ap.add_argument("--out", default="bench/results/gpu_train.json")
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU machine, or pass --device cpu (with --size tiny)")
    os.environ.setdefault("WANDB_MODE", "disabled")
    result = tt.run_and_save(bench, args)
    print(json.dumps({k: result[k] for k in ("device", "size", "ratio_vs_baseline")}))
    for name, s in result["settings"].items():
        print(
            f"{name:22} {s['tokens_per_s']:10.0f} tok/s  padding {s['padding_share']}  "
            f"peak {s['peak_memory_gib']} GiB  MFU {s['mfu']}"
        )


if __name__ == "__main__":
    main()
