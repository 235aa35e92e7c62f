"""Benchmark: traces/s of the filter's full rule pipeline on one core, against a plain regex baseline
measured in the same run on the same traces.

    .venv/bin/python bench/filter_checks.py [--traces 100000] [--distinct 2000] [--without CHECK ...]
        [--out bench/results/filter_checks.json]

The traces are synthetic but shaped like sampled ones: 1,000-3,000 tokens of acoustic reasoning
(about 4 characters a token), mostly well-formed and right, some wrong, some with stray Chinese,
loops, self-cognition claims, control tokens, non-ASCII punctuation, a '<' in the text, transcript talk
with no acoustic term, or cut off. `--distinct`
different traces are generated and cycled through (the checks cache nothing between traces).
- baseline: what a plain filter does: one regex `<think>(.*?)</think>\\s*(.*)` (DOTALL) to split the
  trace, then a normalized comparison of the answer line with the reference.
- distill: RulePipeline.run with every rule check on (finished, control tokens, format, length,
  language, degeneration, self-cognition, correct, agreement, acoustic terms).
One process, one thread; the ratio is baseline time / distill time.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.filter.config import FilterConfig
from distill.filter.rules import RulePipeline

SENTENCES = [
    "The first onset arrives near {a:.2f} s and the energy holds steady for about {b:.2f} s.",
    "Its spectrum peaks near {f} Hz, with a weaker partial close to {g} Hz.",
    "Comparing the two segments, the second is about {d} dB louder than the first.",
    "The envelope decays quickly after each click, roughly every {a:.2f} s, which is about {t} BPM.",
    "A band of broadband noise sits underneath, but the tonal component stays clear above it.",
    "So far the evidence points one way; I will check the pitch once more against the {f} Hz boundary.",
    "Listening again to the middle part, the frequency does not glide; it stays within a few hertz.",
    "The loudness contour rises by {d} dB over {b:.2f} s and then falls back to the noise floor.",
]
# Reasoning over an imagined transcript: no acoustic term, so the lexical check scans every term.
TRANSCRIPT = [
    "The speaker says the word {w}, and the sentence that follows repeats it.",
    "According to the words, the answer should be {w}; the text gives it away.",
    "I think the person mentions {w} twice, which settles the question.",
]
# Chat tokens and stand-ins for a family's audio markup (the check's cost depends on their number).
CONTROL = ("<|im_start|>", "<|im_end|>", "<|audio_1|>", "<|audio_2|>", "<|audio_3|>", "<|endoftext|>")


def make_trace(rng: random.Random, index: int) -> dict:
    """One synthetic trace; every 10th to 50th has a defect, like real samples."""
    target_chars = rng.randint(1000, 3000) * 4
    parts: list[str] = []
    size = 0
    while size < target_chars:
        s = rng.choice(SENTENCES).format(
            a=rng.uniform(0, 3),
            b=rng.uniform(0.1, 2),
            f=rng.randint(100, 4000),
            g=rng.randint(100, 4000),
            d=rng.randint(1, 20),
            t=rng.randint(60, 200),
        )
        parts.append(s)
        size += len(s) + 1
    answer = rng.choice(["high", "low"])
    reasoning = " ".join(parts) + f" Therefore the pitch is {answer}."
    kind = index % 50
    if kind == 1:
        reasoning = reasoning[: len(reasoning) // 2] + " 所以音调很高 " + reasoning[len(reasoning) // 2 :]
    elif kind == 2:
        reasoning = reasoning[: len(reasoning) // 2] + " so the answer is high," * 60
    elif kind == 3:
        reasoning = "I cannot hear the audio, but I will reason about typical tones. " + reasoning
    elif kind in (4, 5, 6, 7, 8):
        reasoning = reasoning.replace(" s.", " s — roughly.", 3)  # non-ASCII punctuation, still English
    elif kind in (11, 12):
        reasoning = reasoning.replace(" Hz,", " Hz (< 500 Hz),", 1)  # a '<' that is no tag
    elif kind in (13, 14):
        reasoning = " ".join(rng.choice(TRANSCRIPT).format(w=answer) for _ in range(len(parts)))
    completion = f"<think>\n{reasoning}\n</think>\n{answer}"
    if kind == 9:
        completion += "<|im_start|>user"
    finish = "length" if kind == 10 else "stop"
    reference = answer if kind % 5 else ("low" if answer == "high" else "high")
    return {
        "completion": completion,
        "finish_reason": finish,
        "reference": reference,
        "choices": ["high", "low"],
        "question": "Listen to the tone. Is its pitch high or low?",
        "reasoning_tokens": len(reasoning) // 4,
    }


def baseline(traces: list[dict], n: int) -> tuple[float, int]:
    split = re.compile(r"<think>(.*?)</think>\s*(.*)", re.DOTALL)
    kept = 0
    start = time.perf_counter()
    for i in range(n):
        t = traces[i % len(traces)]
        m = split.search(t["completion"])
        kept += bool(m and m.group(2).strip().lower() == t["reference"])
    return time.perf_counter() - start, kept


def pipeline(traces: list[dict], n: int, without: tuple[str, ...] = ()) -> tuple[float, int]:
    cfg = FilterConfig()
    rules = RulePipeline(replace(cfg, checks=[c for c in cfg.checks if c not in without]), CONTROL)
    kept = 0
    start = time.perf_counter()
    for i in range(n):
        kept += not any(rules.run(traces[i % len(traces)]).values())
    return time.perf_counter() - start, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=100_000)
    ap.add_argument("--distinct", type=int, default=2000)
    ap.add_argument("--out", default="bench/results/filter_checks.json")
    ap.add_argument("--without", nargs="*", default=[], help="also time the pipeline without these checks")
    args = ap.parse_args()
    rng = random.Random(0)
    traces = [make_trace(rng, i) for i in range(args.distinct)]
    pipeline(traces, 2000)  # warm up (regex compilation, caches) for both alike
    baseline(traces, 2000)
    t_base, kept_base = baseline(traces, args.traces)
    t_ours, kept_ours = pipeline(traces, args.traces)
    t_less = pipeline(traces, args.traces, tuple(args.without))[0] if args.without else None
    chars = sum(len(t["completion"]) for t in traces) / len(traces)
    result = {
        "traces": args.traces,
        "distinct": args.distinct,
        "mean_chars": round(chars),
        "mean_tokens_approx": round(chars / 4),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "traces_per_s": {
            "baseline_regex": round(args.traces / t_base),
            "distill_rule_pipeline": round(args.traces / t_ours),
        },
        "ratio_vs_baseline": round(t_base / t_ours, 2),
        **({f"traces_per_s_without_{'_'.join(args.without)}": round(args.traces / t_less)} if t_less else {}),
        "kept_fraction": {
            "baseline_regex": round(kept_base / args.traces, 3),
            "distill_rule_pipeline": round(kept_ours / args.traces, 3),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
