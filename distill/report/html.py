"""`distill report RUN_DIR`: one self-contained HTML page of a run (charts and audio embedded).

Everything comes from the run directory (the rounds' stats, eval rows and kept traces), so a
report can be written while the run goes on, on any machine that has the folder.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from distill.core.files import atomic_write_text
from distill.core.rundir import RoundDir, RunDir
from distill.report.metrics import format_table, round_record
from distill.report.plots import charts
from distill.report.traces import sample_traces, wav_bytes

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.charts { display: grid; grid-template-columns: repeat(2, 1fr); gap: 1em; }
.charts img { width: 100%; border: 1px solid #eee; }
.warn { color: #b00020; font-weight: 600; }
.trace { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin: 0.6em 0; }
.trace pre { white-space: pre-wrap; background: #fafafa; padding: 0.5em; margin: 0.4em 0; max-height: 16em;
             overflow: auto; }
.ok { color: #137333; } .bad { color: #b00020; }
"""

# Marks the page's images that failed to decode, and counts those that did (a check that the
# page renders, for people and for the headless-browser test).
CHECK_IMAGES = """
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  broken.forEach(i => i.insertAdjacentHTML("afterend", '<p class="warn">chart failed to load</p>'));
  document.body.dataset.imagesLoaded = imgs.length - broken.length;
  document.body.dataset.imagesBroken = broken.length;
});
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1%}" if signed else f"{value:.1%}"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def rounds_table(records: list[dict]) -> str:
    benches = sorted({b for r in records for b in (r.get("benchmarks") or {})})
    head = [
        "round",
        "stage",
        "held-out",
        "maj@k",
        "pass@k",
        "thinking budgets",
        "eval gap",
        "samples",
        "kept",
        "top rejection",
        "probe gap",
        "train loss",
        "eval share",
        *benches,
    ]
    rows = []
    for r in records:
        curve = r.get("budget_accuracy") or {}
        curve_text = " / ".join(f"{b}: {a:.0%}" for b, a in curve.items()) or "-"
        if r.get("inverted_scaling"):
            curve_text = f'<span class="warn">{_e(curve_text)} (inverted)</span>'
        else:
            curve_text = _e(curve_text)
        reasons = r.get("rejected_by_reason") or {}
        top = max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else "-"
        cells = [
            f"{r['round']}" + (" (cold start)" if r["round"] == 0 else ""),
            _e(r.get("stage")),
            _pct(r.get("heldout_accuracy")),
            _pct(r.get("majority_accuracy")),
            _pct(r.get("pass_at_k")),
            curve_text,
            _pct(r.get("eval_grounding_gap"), True),
            _e(r.get("samples") or "-"),
            _e(r.get("kept") if r.get("kept") is not None else "-"),
            _e(top),
            _pct(r.get("grounding_gap"), True),
            "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}",
            _pct(r.get("eval_share")),
            *(_pct((r.get("benchmarks") or {}).get(b)) for b in benches),
        ]
        rows.append(
            "<tr>"
            + "".join(
                f'<td class="l">{c}</td>' if i in (1, 5, 9) else f"<td>{c}</td>" for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def trace_block(row: dict) -> str:
    audio = wav_bytes(row["audio"]) if row.get("audio") else None
    player = (
        f'<audio controls preload="none" src="data:audio/wav;base64,{base64.b64encode(audio).decode()}">'
        "</audio>"
        if audio
        else f'<p class="warn">audio not found: {_e(row.get("audio"))}</p>'
    )
    mark = '<b class="ok">right</b>' if row["correct"] else '<b class="bad">wrong</b>'
    budgets = ", ".join(f"{b}: {'right' if ok else 'wrong'}" for b, ok in (row.get("budgets") or {}).items())
    cf = ", ".join(
        f"{k}: {'right' if ok else 'wrong'}" for k, ok in (row.get("counterfactual") or {}).items()
    )
    choices = f" (options: {_e(', '.join(row['choices']))})" if row.get("choices") else ""
    return (
        f'<div class="trace"><div><b>{_e(row["item_id"])}</b> [{_e(row.get("family"))}] {mark}; '
        f"reference: <b>{_e(row['reference'])}</b></div>"
        f"<div>{_e(row.get('question'))}{choices}</div>{player}"
        f"<pre>{_e(row['completion'])}</pre>"
        f"<div>budgets: {_e(budgets or '-')}; counterfactual audio: {_e(cf or '-')}</div></div>"
    )


def round_section(rd: RoundDir, record: dict, samples: int) -> str:
    parts = [f"<h3>Round {rd.index}</h3>"]
    cats = record.get("heldout_per_category") or {}
    fams = record.get("heldout_per_family") or {}
    if cats or fams:
        parts.append(
            "<table><tr><th class='l'>group</th><th>accuracy</th></tr>"
            + "".join(
                f"<tr><td class='l'>{_e(kind)}: {_e(k)}</td><td>{_pct(v)}</td></tr>"
                for kind, groups in (("category", cats), ("family", fams))
                for k, v in groups.items()
            )
            + "</table>"
        )
    traces = (record.get("eval_traces") or {}).get("greedy")
    if traces:
        dist = traces.get("reasoning_tokens") or {}
        parts.append(
            f"<p>Greedy traces: {traces['traces']}; reasoning tokens p10/p50/p90 "
            f"{dist.get('p10', '-')}/{dist.get('p50', '-')}/{dist.get('p90', '-')}; truncated "
            f"{_pct(traces['truncated_rate'])}, format errors {_pct(traces['format_error_rate'])}, "
            f"language drift {_pct(traces['language_drift_rate'])}, degenerate "
            f"{_pct(traces['degeneration_rate'])}.</p>"
        )
    rl = record.get("rl")
    if rl and rl["steps"]:
        first, last = rl["first"], rl["last"]
        parts.append(
            f"<p>RL: {rl['steps']} steps on {rl['band_items']} items of the pass-rate band; mean reward "
            f"{first['reward/reward']:.3f} &rarr; {last['reward/reward']:.3f}, accuracy "
            f"{_pct(first['accuracy'])} &rarr; {_pct(last['accuracy'])}, reasoning tokens (mean / p90) "
            f"{first['reasoning_tokens_mean']:.0f} / {first['reasoning_tokens_p90']:.0f} &rarr; "
            f"{last['reasoning_tokens_mean']:.0f} / {last['reasoning_tokens_p90']:.0f}.</p>"
        )
        parts.extend(f'<p class="warn">RL {_e(w)}</p>' for w in rl["warnings"])
    elif rl:
        parts.append(f"<p>RL skipped: {_e(rl['skipped'])}</p>")
    inv = record.get("inverted_scaling")
    if inv:
        parts.append(
            f'<p class="warn">Inverted scaling: accuracy falls from {_pct(inv["from_accuracy"])} at '
            f"{inv['from_budget']} thinking tokens to {_pct(inv['to_accuracy'])} at {inv['to_budget']}.</p>"
        )
    parts.extend(trace_block(row) for row in sample_traces(rd, samples))
    return "\n".join(parts)


def write_report(run_dir: Path, out: Path, samples: int = 3) -> Path:
    """Write the HTML report of the run at `run_dir` to `out`; return `out`."""
    run = RunDir(run_dir)
    rounds = run.rounds()
    if not rounds:
        raise ValueError(
            f"{run_dir}: no round_NNN directories (not a distill run directory, or nothing ran yet)"
        )
    records = [round_record(rd) for rd in rounds]
    figures = charts(run, records)
    body = [
        f"<h1>distill report: {_e(run.path.name)}</h1>",
        (
            f"<p>{_e(run.path.resolve())} &middot; {len(rounds)} round(s) &middot; written "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
        ),
        "<h2>Rounds</h2>",
        rounds_table(records),
        "<details><summary>as printed by distill run</summary><pre>"
        + _e(format_table(records))
        + "</pre></details>",
        "<h2>Charts</h2>",
        '<div class="charts">' + "".join(_img(png, t) for t, png in figures.items()) + "</div>",
        "<h2>Sample traces</h2>",
        *(round_section(rd, rec, samples) for rd, rec in zip(rounds, records, strict=True)),
    ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>distill: {_e(run.path.name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}<script>{CHECK_IMAGES}</script></body></html>"
    )
    atomic_write_text(out, page)
    return out
