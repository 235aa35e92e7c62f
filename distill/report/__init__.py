"""Reporting: the self-contained HTML report of a run (html.py), its charts (plots.py) and sample
traces with their audio (traces.py); the charts and traces also go to wandb."""

from distill.report.html import write_report

__all__ = ["write_report"]
