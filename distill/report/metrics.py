"""Round metrics: one record per round, built from the stats each stage left on disk.

Because the records are rebuilt from the round directories, a resumed run never logs a round
twice in metrics.jsonl, and the table printed at the end covers the whole run.
"""

from __future__ import annotations

import os
import secrets

from distill.core.files import atomic_write_jsonl, atomic_write_text
from distill.core.rows import read_rl_log
from distill.core.rundir import RoundDir, RunDir

# What the record keeps of an RL step (the first and the last of the stage): rl/log.jsonl has all.
RL_KEYS = (
    "reward/reward",
    "accuracy",
    "reasoning_tokens_mean",
    "reasoning_tokens_p90",
    "kl",
    "clip_fraction",
)


def rl_record(rd: RoundDir, stats: dict) -> dict | None:
    """The round's RL in brief: steps, band, the first and last step, warnings; None without RL."""
    steps = read_rl_log(rd)
    if not steps and not stats.get("skipped"):
        return None
    return {
        "steps": len(steps),
        "band_items": stats.get("band_items"),
        "skipped": stats.get("skipped"),
        "first": {k: steps[0].get(k) for k in RL_KEYS} if steps else None,
        "last": {k: steps[-1].get(k) for k in RL_KEYS} if steps else None,
        "warnings": [f"step {r['step']}: {r['warning']}" for r in steps if r.get("warning")],
    }


def round_record(rd: RoundDir) -> dict:
    stats = rd.stats()
    sample, ground, filt, train, ev = (
        stats.get(s, {}) for s in ("sample", "ground", "filter", "train", "eval")
    )
    seconds = {s: v.get("seconds") for s, v in stats.items()}
    return {
        "round": rd.index,
        "stage": rd.last_stage(),
        "samples": filt.get("traces"),
        "sample_accuracy": filt.get("sample_accuracy"),
        "kept": filt.get("kept"),
        "kept_fraction": filt.get("kept_fraction"),
        "rejected_by_reason": filt.get("rejected_by_reason"),
        "rejected_by_category": filt.get("by_category"),
        "mean_reward": filt.get("mean_reward"),
        "prompts": filt.get("prompts"),
        "prompts_in_band": None
        if filt.get("prompts") is None
        else filt["prompts"] - filt.get("prompts_out_of_band", 0),
        "prompts_all_solved": filt.get("prompts_all_solved"),
        "prompts_all_failed": filt.get("prompts_all_failed"),
        # Grounding: probe accuracy with the real audio minus with counterfactual audio, items
        # answerable from text, and how much the kept and rejected traces depend on the audio.
        "grounding_gap": ground.get("grounding_gap"),
        "grounding_gap_by_kind": ground.get("grounding_gap_by_kind"),
        "probe_accuracy": ground.get("probe_accuracy"),
        # ... as a share of the items probed (grounding.probe_items: those with a keepable trace).
        "items_probed": ground.get("items_probed"),
        "text_solvable_share": ground.get("text_solvable_share"),
        "text_solvable_by_category": ground.get("text_solvable_by_category"),
        "dependence_kept": filt.get("dependence_kept"),
        "dependence_rejected": filt.get("dependence_rejected"),
        "acoustic_terms_rate": filt.get("acoustic_terms_rate"),
        "grounding_cost": (
            round(seconds["ground"] / seconds["sample"], 4)
            if seconds.get("ground") is not None and seconds.get("sample")
            else None
        ),
        "train_steps": train.get("steps"),
        "train_loss": train.get("final_loss"),
        "train_tokens_per_s": train.get("tokens_per_s"),
        "train_padding_share": train.get("padding_share"),
        "rl": rl_record(rd, stats.get("rl", {})),
        "heldout_accuracy": ev.get("accuracy"),
        "heldout_per_family": ev.get("per_family"),
        "heldout_per_category": ev.get("per_category"),
        # Eval: k samples, the test-time scaling curve, the grounding gap, trace statistics.
        "eval_k": ev.get("k"),
        "pass_at_k": (ev.get("pass_at") or {}).get(str(ev.get("k"))),
        "pass_at": ev.get("pass_at"),
        "majority_accuracy": ev.get("majority_accuracy"),
        "budget_accuracy": ev.get("budgets"),
        "inverted_scaling": ev.get("inverted_scaling"),
        "eval_grounding_gap": (ev.get("grounding") or {}).get("gap"),
        "eval_gap_by_kind": (ev.get("grounding") or {}).get("gap_by_kind"),
        "eval_traces": ev.get("traces"),
        "benchmarks": {name: b["mmau_accuracy"] for name, b in (ev.get("benchmarks") or {}).items()} or None,
        "eval_share": (
            round(seconds["eval"] / sum(v for v in seconds.values() if v), 4) if seconds.get("eval") else None
        ),
        "model_sha256": stats.get("export", {}).get("weights_sha256"),
        "sampled_from_sha256": sample.get("model_sha256"),
        "seconds": seconds,
    }


def write_run_metrics(run: RunDir) -> list[dict]:
    records = [round_record(rd) for rd in run.rounds()]
    atomic_write_jsonl(run.metrics, records)
    return records


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _top_reject(record: dict) -> str:
    """The most common rejection reason and its share of the round's traces."""
    reasons, samples = record.get("rejected_by_reason") or {}, record.get("samples")
    if not reasons or not samples:
        return "-"
    reason, n = max(reasons.items(), key=lambda kv: kv[1])
    return f"{reason} {n / samples:.0%}"


def _curve(budgets: dict | None, inverted: dict | None) -> str:
    """The test-time scaling curve as accuracies (%) at increasing budgets, '!' when inverted."""
    if not budgets:
        return "-"
    return "/".join(f"{100 * a:.0f}" for a in budgets.values()) + ("!" if inverted else "")


def _rl_reward(rl: dict | None) -> str:
    """'0.46->0.81': the rl stage's mean reward at its first and last step ('skip': empty band)."""
    if not rl:
        return "-"
    if not rl["steps"]:
        return "skip"
    return f"{rl['first']['reward/reward']:.2f}->{rl['last']['reward/reward']:.2f}"


def format_table(records: list[dict]) -> str:
    """The per-round table printed at the end of `distill run`."""
    header = [
        "round",
        "stage",
        "samples",
        "kept",
        "kept%",
        "sample_acc",
        "in_band",
        "top_reject",
        "gap",
        "text_solv",
        "dep_kept",
        "train_loss",
        "rl_reward",
        "heldout_acc",
        "maj@k",
        "budget_acc",
        "eval_gap",
        "time_s",
    ]
    lines = [header]
    for r in records:
        total = sum(v for v in r["seconds"].values() if v)
        lines.append(
            [
                f"{r['round']:d}" + (" (cold start)" if r["round"] == 0 else ""),
                _fmt(r["stage"]),
                _fmt(r["samples"]),
                _fmt(r["kept"]),
                _fmt(r["kept_fraction"], ".0%"),
                _fmt(r["sample_accuracy"], ".1%"),
                "-" if r["prompts"] is None else f"{r['prompts_in_band']}/{r['prompts']}",
                _top_reject(r),
                _fmt(r.get("grounding_gap"), "+.1%"),
                _fmt(r.get("text_solvable_share"), ".0%"),
                _fmt((r.get("dependence_kept") or {}).get("p50"), "+.3f"),
                _fmt(r["train_loss"], ".4f"),
                _rl_reward(r.get("rl")),
                _fmt(r["heldout_accuracy"], ".1%"),
                _fmt(r.get("majority_accuracy"), ".1%"),
                _curve(r.get("budget_accuracy"), r.get("inverted_scaling")),
                _fmt(r.get("eval_grounding_gap"), "+.1%"),
                f"{total:.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


class WandbLogger:
    """Round metrics to wandb (offline by default: written under the run directory, no network)."""

    def __init__(self, run: RunDir, mode: str, project: str, config: dict):
        self.wb = None
        if mode == "disabled":
            return
        import wandb

        # wandb stages logged tables' media (the sample traces' audio) as artifact files in its data
        # folder until a sync; keep them under the run directory too, unless the user chose a place.
        os.environ.setdefault("WANDB_DATA_DIR", str(run.path / "wandb"))
        # One wandb run per run directory: a resumed `distill run` continues it.
        id_file = run.path / "wandb_id"
        if not id_file.exists():
            atomic_write_text(id_file, secrets.token_hex(4) + "\n")
        self.wb = wandb.init(
            project=project,
            name=run.path.name,
            dir=str(run.path),
            mode=mode,
            config=config,
            id=id_file.read_text().strip(),
            resume="allow",
            reinit="finish_previous",
        )

    def log_round(self, rd: RoundDir, record: dict, run: RunDir, samples: int = 4) -> None:
        """Log a finished round once: its numbers, the report's charts of the run so far, and a table of
        `samples` eval traces with their audio. A marker in the round directory remembers it across
        resumes."""
        marker = rd.path / "wandb_logged"
        if self.wb is None or marker.exists():
            return
        flat = {k: v for k, v in record.items() if isinstance(v, int | float)}
        for reason, n in (record.get("rejected_by_reason") or {}).items():
            flat[f"rejected/{reason}"] = n
        for category, counts in (record.get("rejected_by_category") or {}).items():
            for reason, n in counts.items():
                flat[f"by_category/{category}/{reason}"] = n
        for family, acc in (record.get("heldout_per_family") or {}).items():
            flat[f"heldout_accuracy/{family}"] = acc
        for category, acc in (record.get("heldout_per_category") or {}).items():
            flat[f"heldout_by_category/{category}"] = acc
        for k, acc in (record.get("pass_at") or {}).items():
            flat[f"pass_at/{k}"] = acc
        for budget, acc in (record.get("budget_accuracy") or {}).items():
            flat[f"budget_accuracy/{budget}"] = acc
        for kind, gap in (record.get("eval_gap_by_kind") or {}).items():
            flat[f"eval_grounding_gap/{kind}"] = gap
        for name, acc in (record.get("benchmarks") or {}).items():
            flat[f"benchmark/{name}"] = acc
        for split, stats in (record.get("eval_traces") or {}).items():
            for stat, value in (stats or {}).items():
                if isinstance(value, int | float):
                    flat[f"eval_traces/{split}/{stat}"] = value
        flat["inverted_scaling"] = int(record.get("inverted_scaling") is not None)
        for kind, gap in (record.get("grounding_gap_by_kind") or {}).items():
            flat[f"grounding_gap/{kind}"] = gap
        for side in ("kept", "rejected"):
            for stat, value in (record.get(f"dependence_{side}") or {}).items():
                flat[f"dependence_{side}/{stat}"] = value
        for stage, seconds in record["seconds"].items():
            if seconds is not None:
                flat[f"seconds/{stage}"] = seconds
        for side in ("first", "last"):
            for key, value in ((record.get("rl") or {}).get(side) or {}).items():
                if isinstance(value, int | float):
                    flat[f"rl_{side}/{key}"] = value
        self.wb.log({**flat, **self.media(rd, run, samples)}, step=record["round"])
        atomic_write_text(marker, self.wb.id + "\n")

    def media(self, rd: RoundDir, run: RunDir, samples: int) -> dict:
        """The report's charts as wandb images and the round's sample traces as a wandb table."""
        import io
        from pathlib import Path

        import wandb
        from PIL import Image

        from distill.report.plots import charts
        from distill.report.traces import sample_traces

        records = [round_record(r) for r in run.rounds() if r.index <= rd.index]
        out: dict = {
            f"charts/{title}": wandb.Image(Image.open(io.BytesIO(png)), caption=title)
            for title, png in charts(run, records).items()
        }
        table = wandb.Table(
            columns=["round", "item", "question", "reference", "correct", "completion", "audio"]
        )
        for row in sample_traces(rd, samples):  # rows of older runs lack audio and question
            audio = wandb.Audio(row["audio"]) if row.get("audio") and Path(row["audio"]).exists() else None
            table.add_data(
                rd.index,
                row["item_id"],
                row.get("question"),
                row["reference"],
                row["correct"],
                row["completion"],
                audio,
            )
        out["sample_traces"] = table
        steps = read_rl_log(rd)
        if steps:  # every RL step of the round, as the stage logged it
            columns = sorted({k for r in steps for k in r if isinstance(r[k], int | float)})
            rl_table = wandb.Table(columns=columns)
            for r in steps:
                rl_table.add_data(*(r.get(k) for k in columns))
            out["rl_steps"] = rl_table
        return out

    def finish(self) -> None:
        if self.wb is not None:
            self.wb.finish()
