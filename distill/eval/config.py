"""The `eval` config section: per-round evaluation on the held-out split and any benchmarks, with
the checks of its own values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from data_pipelines.config import FORMATS
from distill.core.schema import ConfigError, check_non_negative, check_positive
from distill.grounding.config import KINDS


@dataclass
class BenchmarkConfig:
    """An external benchmark file evaluated every round (e.g. MMAU's test-mini JSON with its audio
    on local disk), read by the data pipelines' readers and validated like any split."""

    name: str = MISSING
    path: str = MISSING
    format: str = "auto"
    # Folder that relative audio paths start from (default: the file's folder).
    audio_root: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    # Items evaluated (0 = all): a quick look at a large benchmark every round.
    max_items: int = 0


@dataclass
class EvalConfig:
    """Per-round evaluation on the held-out split (and any benchmarks), on one vLLM engine."""

    # Greedy generation budget: reasoning and answer together.
    max_tokens: int = 128
    # Samples per item at `temperature` for pass@k and majority-vote accuracy (0: off).
    k: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    # Thinking budgets of the test-time scaling curve (tokens of reasoning; each at most
    # max_tokens): the greedy reasoning is cut at the budget, `</think>` forced, the answer generated.
    # Empty: 0, a quarter, half and all of max_tokens.
    budgets: list[int] = field(default_factory=list)
    answer_max_tokens: int = 16
    # Text put after reasoning cut at a budget, so the model must answer now.
    force_answer: str = "\n</think>\n"
    # Accuracy at the largest budget this far below the best smaller budget counts as inverted scaling.
    inverted_margin: float = 0.05
    # Grounding gap: greedy accuracy with the real audio minus with each of these.
    counterfactuals: list[str] = field(default_factory=lambda: ["silence", "swap"])
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)

    @property
    def thinking_budgets(self) -> list[int]:
        """`budgets`, or by default 0, a quarter, half and all of `max_tokens`."""
        if self.budgets:
            return list(self.budgets)
        return sorted({0, self.max_tokens // 4, self.max_tokens // 2, self.max_tokens})


def validate(e: EvalConfig) -> None:
    """Raise ConfigError for the first bad value of the `eval` section."""
    check_positive("eval", e, ("max_tokens", "answer_max_tokens"))
    check_non_negative("eval", e, ("k", "temperature", "inverted_margin"))
    if not 0.0 < e.top_p <= 1.0:
        raise ConfigError(f"eval.top_p={e.top_p!r}: must be in (0, 1]")
    if e.k > 1 and e.temperature == 0:
        raise ConfigError(
            f"eval.temperature=0 with eval.k={e.k}: greedy decoding gives one answer; raise the "
            "temperature or set eval.k=1"
        )
    if any(b < 0 for b in e.budgets) or sorted(set(e.budgets)) != list(e.budgets):
        raise ConfigError(
            f"eval.budgets={list(e.budgets)}: must be distinct non-negative token counts in increasing order"
        )
    if e.budgets and e.budgets[-1] > e.max_tokens:
        raise ConfigError(
            f"eval.budgets: {e.budgets[-1]} is above eval.max_tokens={e.max_tokens}, the longest "
            "reasoning eval generates; raise eval.max_tokens or lower the budget"
        )
    if "</think>" not in e.force_answer:
        raise ConfigError(
            f"eval.force_answer={e.force_answer!r}: must close the reasoning (contain </think>)"
        )
    unknown = [k for k in e.counterfactuals if k not in KINDS]
    if unknown:
        raise ConfigError(
            f"eval.counterfactuals: unknown counterfactual(s) {', '.join(unknown)} "
            f"(known: {', '.join(KINDS)})"
        )
    names = [b.name for b in e.benchmarks]
    for i, bench in enumerate(e.benchmarks):
        where = f"eval.benchmarks[{i}]"
        if (
            not bench.name
            or not all(c.isalnum() or c in "-_." for c in bench.name)
            or names.count(bench.name) > 1
        ):
            raise ConfigError(
                f"{where}.name={bench.name!r}: must be a unique name of letters, digits, '-', '_', '.'"
            )
        if bench.format not in FORMATS:
            raise ConfigError(f"{where}.format={bench.format!r}: must be one of {', '.join(FORMATS)}")
        if not Path(bench.path).exists():
            raise ConfigError(f"{where}.path={bench.path}: no such file")
        if bench.max_items < 0:
            raise ConfigError(f"{where}.max_items={bench.max_items}: must be >= 0")
