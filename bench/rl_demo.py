"""What RL does in the CPU demo: round 1 of configs/demo_rl_cpu.yaml finished four ways from the
same SFT student, and each way's held-out accuracy, reasoning length and grounding gap.

    .venv/bin/python bench/rl_demo.py [--work DIR] [--out bench/results/rl_demo.json]

Round 0 (the cold start) and round 1's sample, ground, filter and train stages run once; the run
directory is then kept aside and each variant continues it with its own rl settings (written into
the run's config.yaml before its stages run: the preset's config with the variant's overrides, so
each is the run it would be had it been started with them) through rl, export and eval:
- sft_only: rl.enabled=false (the round's export and eval are the SFT student's: "before RL");
- rl_correct_format: the preset's RL, Step-Audio-R1's reward 0.8 x correct + 0.2 x format;
- rl_correct_only: the format term off (rl.rewards.format=0), the report's ablation;
- rl_grounding: the report's reward plus the grounding reward (rl.rewards.grounding=0.2): audio
  dependence against a swapped clip, per reasoning token.
Numbers per variant: held-out accuracy (greedy), maj@k, the greedy traces' format error rate and
mean reasoning tokens, the eval's grounding gap (accuracy with the real audio minus with the
counterfactuals), and the RL log's mean reward, accuracy and reasoning tokens over its first 5 and
its last 5 steps (one step's 16 prompts are too few to read alone), with the stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import config_diff, load_config, to_yaml
from distill.core.files import read_json, read_jsonl

CONFIG = "configs/demo_rl_cpu.yaml"
VARIANTS = {
    "sft_only": ["rl.enabled=false"],
    "rl_correct_format": [],
    "rl_correct_only": ["rl.rewards.format=0"],
    "rl_grounding": ["rl.rewards.grounding=0.2"],
}


def distill(*args: str, log: Path) -> None:
    with log.open("a") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "distill.cli", *args], stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise RuntimeError(f"distill {' '.join(args)} failed; see {log}")


def from_sft(work: Path, overrides: list[str]) -> Path:
    """The preset's run in `work` as it stood after round 1's SFT (made once, then kept aside in
    work/after_sft), with its config set to the preset's as it is now plus `overrides`; refused
    when the kept run was made with other settings than the preset's outside the rl section."""
    run, kept, log = work / "demo_rl_cpu", work / "after_sft", work / "distill.log"
    work.mkdir(parents=True, exist_ok=True)
    if not kept.exists():
        shutil.rmtree(run, ignore_errors=True)
        common = [CONFIG, f"output_dir={work}", "loop.rounds=1"]
        distill("stage", "filter,train,export,eval", "--round", "0", *common, log=log)
        distill("stage", "sample,ground,filter,train", "--round", "1", *common, log=log)
        shutil.copytree(run, kept, symlinks=True)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(kept, run, symlinks=True)
    cfg = load_config(CONFIG, [f"output_dir={work}", "loop.rounds=1", *overrides])
    changed = [k for k in config_diff(load_config(run / "config.yaml"), cfg) if not k.startswith("rl.")]
    if changed:
        raise SystemExit(f"{kept}: made with other settings ({', '.join(changed)}); delete {work}")
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def window(lines: list[dict], key: str) -> float:
    """The mean of `key` over up to 5 steps: one step's prompts are too few to read alone."""
    return round(sum(r[key] for r in lines) / len(lines), 4)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def variant_numbers(run: Path) -> dict:
    rd = run / "round_001"
    ev = read_json(rd / "eval.json")
    record = {
        "heldout_accuracy": ev["accuracy"],
        "majority_accuracy": ev["majority_accuracy"],
        # None: no greedy trace closed its reasoning.
        "reasoning_tokens": (ev["traces"]["greedy"]["reasoning_tokens"] or {}).get("mean"),
        "format_error_rate": ev["traces"]["greedy"]["format_error_rate"],
        "grounding_gap": ev["grounding"]["gap"],
        "rl": None,
    }
    log = rd / "rl" / "log.jsonl"
    if log.exists():
        lines = list(read_jsonl(log))
        keys = ("reward/reward", "accuracy", "reasoning_tokens_mean")
        record["rl"] = {
            "steps": len(lines),
            "first_5_steps": {k: window(lines[:5], k) for k in keys},
            "last_5_steps": {k: window(lines[-5:], k) for k in keys},
            "band_items": read_json(rd / "stats" / "rl.json")["band_items"],
            "seconds": read_json(rd / "stats" / "rl.json")["seconds"],
        }
    return record


def table(results: dict) -> str:
    rows = [
        "| variant | held-out acc | maj@k | format errors | reasoning tokens | grounding gap "
        "| RL reward, steps 1-5 -> last 5 | RL reasoning tokens | RL s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rl = r["rl"]
        a, b = (rl["first_5_steps"], rl["last_5_steps"]) if rl else ({}, {})
        reward = f"{a['reward/reward']:.2f} -> {b['reward/reward']:.2f}" if rl else "-"
        length = f"{a['reasoning_tokens_mean']:.0f} -> {b['reasoning_tokens_mean']:.0f}" if rl else "-"
        tokens = "-" if r["reasoning_tokens"] is None else f"{r['reasoning_tokens']:.1f}"
        gap = "-" if r["grounding_gap"] is None else f"{r['grounding_gap']:+.1%}"
        rows.append(
            f"| {name} | {r['heldout_accuracy']:.1%} | {r['majority_accuracy']:.1%} | "
            f"{r['format_error_rate']:.0%} | {tokens} | {gap} | {reward} | {length} | "
            f"{rl['seconds'] if rl else '-'} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/distill_rl_demo")
    p.add_argument("--out", default="bench/results/rl_demo.json")
    args = p.parse_args()
    work = Path(args.work)
    log = work / "distill.log"
    results = {}
    for name, overrides in VARIANTS.items():
        run = from_sft(work, overrides)
        config = run / "config.yaml"
        distill("stage", "rl,export,eval", "--round", "1", str(config), log=log)
        results[name] = variant_numbers(run)
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(run, work / name, symlinks=True)
        print(name, json.dumps(results[name]), flush=True)
    print(table(results))
    Path(args.out).write_text(json.dumps({"machine": cpu_name(), "variants": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
