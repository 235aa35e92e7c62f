"""The report's charts (matplotlib, headless), each a function of the round records -> PNG bytes.

The same PNGs go into the HTML report and to wandb, so both show one picture of a run.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display: reports are written on clusters and in CI
import matplotlib.pyplot as plt

from distill.core.files import read_jsonl
from distill.core.rows import read_rl_log
from distill.core.rundir import RunDir

# Rejection reasons drawn one by one; the rest are summed as "other".
TOP_REASONS = 6
# Green is for kept traces only; rejection reasons take the other colours.
KEPT_COLOR = "tab:green"
REASON_COLORS = ("tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _rounds(records: list[dict]) -> list[int]:
    return [r["round"] for r in records]


def accuracy_per_round(records: list[dict]) -> bytes:
    """Held-out greedy accuracy, majority vote and pass@k, and each benchmark, by round."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = _rounds(records)
    series = {
        "greedy": [r.get("heldout_accuracy") for r in records],
        "majority vote": [r.get("majority_accuracy") for r in records],
        "pass@k": [r.get("pass_at_k") for r in records],
    }
    for name in sorted({b for r in records for b in (r.get("benchmarks") or {})}):
        series[name] = [(r.get("benchmarks") or {}).get(name) for r in records]
    for label, values in series.items():
        points = [(a, v) for a, v in zip(x, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02), title="Held-out accuracy per round")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def scaling_curves(records: list[dict]) -> bytes:
    """Accuracy against the thinking budget, one line per round; rounds whose accuracy falls as
    thinking grows (inverted scaling) are dashed and marked in the legend."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in records:
        curve = r.get("budget_accuracy") or {}
        if not curve:
            continue
        budgets = sorted(int(b) for b in curve)
        inverted = r.get("inverted_scaling") is not None
        ax.plot(
            budgets,
            [curve[str(b)] for b in budgets],
            marker="o",
            linestyle="--" if inverted else "-",
            label=f"round {r['round']}" + (" (inverted)" if inverted else ""),
        )
    ax.set(xlabel="thinking budget (tokens)", ylabel="accuracy", ylim=(0, 1.02), title="Test-time scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def grounding_gap(records: list[dict]) -> bytes:
    """Eval accuracy with the real audio minus with each counterfactual, by round (bars), and the
    ground stage's probe gap on the round's question pool (line)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    kinds = sorted({k for r in records for k in (r.get("eval_gap_by_kind") or {})})
    x = _rounds(records)
    width = 0.8 / max(1, len(kinds))
    for j, kind in enumerate(kinds):
        values = [(r.get("eval_gap_by_kind") or {}).get(kind) for r in records]
        ax.bar(
            [a - 0.4 + width * (j + 0.5) for a in x], [v or 0 for v in values], width, label=f"eval: {kind}"
        )
    probe = [
        (a, r["grounding_gap"]) for a, r in zip(x, records, strict=True) if r.get("grounding_gap") is not None
    ]
    if probe:
        ax.plot(*zip(*probe, strict=True), color="black", marker="s", label="ground stage probes")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(
        xlabel="round", ylabel="accuracy gap (real - counterfactual)", title="Grounding gap: does it listen?"
    )
    ax.set_xticks(x)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _png(fig)


def kept_and_rejected(records: list[dict]) -> bytes:
    """Per sampling round, the share of traces kept and of each rejection reason (stacked)."""
    rows = [r for r in records if r.get("samples")]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    totals: dict[str, int] = {}
    for r in rows:
        for reason, n in (r.get("rejected_by_reason") or {}).items():
            totals[reason] = totals.get(reason, 0) + n
    top = sorted(totals, key=totals.get, reverse=True)[:TOP_REASONS]
    x = [r["round"] for r in rows]
    bottom = [0.0] * len(rows)
    layers = {"kept": [(r.get("kept") or 0) / r["samples"] for r in rows]}
    for reason in top:
        layers[reason] = [(r.get("rejected_by_reason") or {}).get(reason, 0) / r["samples"] for r in rows]
    if len(totals) > len(top):
        layers["other"] = [
            sum(n for k, n in (r.get("rejected_by_reason") or {}).items() if k not in top) / r["samples"]
            for r in rows
        ]
    colors = [KEPT_COLOR, *REASON_COLORS]
    for j, (label, values) in enumerate(layers.items()):
        ax.bar(x, values, 0.6, bottom=bottom, label=label, color=colors[j])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(
        xlabel="round",
        ylabel="share of sampled traces",
        ylim=(0, 1.0),
        title="Kept traces and rejection reasons",
    )
    ax.set_xticks(x or [0])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def trace_lengths(lengths: dict[int, dict[str, list[int]]]) -> bytes:
    """Reasoning length per round: the eval's greedy traces and the round's kept traces (box plots)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    rounds = sorted(lengths)
    for j, (kind, color) in enumerate((("eval", "tab:blue"), ("kept", "tab:orange"))):
        data = [(i, lengths[i].get(kind) or []) for i in rounds]
        data = [(i, v) for i, v in data if v]
        if not data:
            continue
        pos = [i - 0.18 + 0.36 * j for i, _ in data]
        box = ax.boxplot(
            [v for _, v in data], positions=pos, widths=0.3, patch_artist=True, manage_ticks=False
        )
        for patch in box["boxes"]:
            patch.set_facecolor(color)
        ax.plot([], [], color=color, linewidth=6, label=f"{kind} traces")
    ax.set(xlabel="round", ylabel="reasoning tokens", title="Trace lengths")
    ax.set_xticks(rounds or [0])
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _png(fig)


def run_trace_lengths(run: RunDir) -> dict[int, dict[str, list[int]]]:
    """Reasoning tokens per round: the eval's greedy traces and the kept traces (rounds that sampled)."""
    out: dict[int, dict[str, list[int]]] = {}
    for rd in run.rounds():
        lengths: dict[str, list[int]] = {}
        eval_rows = rd.path / "eval_samples.jsonl"
        if eval_rows.exists():
            lengths["eval"] = [
                r["reasoning_tokens"] for r in read_jsonl(eval_rows) if r.get("reasoning_tokens") is not None
            ]
        if rd.filtered.exists():
            lengths["kept"] = [
                r["reasoning_tokens"]
                for r in read_jsonl(rd.filtered)
                if r.get("reasoning_tokens") is not None
            ]
        out[rd.index] = lengths
    return out


def rl_progress(steps: dict[int, list[dict]]) -> bytes:
    """Per RL step of each round: mean reward and accuracy (left), mean and p90 reasoning length
    (right: the collapse Step-Audio-R1 warns of shows as a falling line)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for index, lines in sorted(steps.items()):
        x = [r["step"] for r in lines]
        left.plot(x, [r["reward/reward"] for r in lines], marker="o", label=f"round {index}: reward")
        left.plot(x, [r["accuracy"] for r in lines], linestyle="--", label=f"round {index}: accuracy")
        right.plot(x, [r["reasoning_tokens_mean"] for r in lines], marker="o", label=f"round {index}: mean")
        right.plot(x, [r["reasoning_tokens_p90"] for r in lines], linestyle="--", label=f"round {index}: p90")
    left.set(xlabel="RL step", ylabel="mean over the step's samples", title="RL: reward and accuracy")
    right.set(xlabel="RL step", ylabel="reasoning tokens", title="RL: reasoning length")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def charts(run: RunDir, records: list[dict]) -> dict[str, bytes]:
    """The report's PNG charts by title (also logged to wandb); the RL chart when a round ran RL."""
    figures = {
        "Held-out accuracy per round": accuracy_per_round(records),
        "Test-time scaling": scaling_curves(records),
        "Grounding gap": grounding_gap(records),
        "Kept traces and rejection reasons": kept_and_rejected(records),
        "Trace lengths": trace_lengths(run_trace_lengths(run)),
    }
    steps = {rd.index: lines for rd in run.rounds() if (lines := read_rl_log(rd))}
    if steps:
        figures["RL steps"] = rl_progress(steps)
    return figures
