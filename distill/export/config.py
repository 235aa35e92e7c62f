"""The `export` and `hub` config sections: the gate an exported model passes, and where finished
rounds are pushed, with the checks of their own values."""

from __future__ import annotations

from dataclasses import dataclass

from distill.core.schema import check_positive


@dataclass
class ExportConfig:
    """The export gate: the exported model must load in vLLM, generate, and agree with transformers."""

    # Held-out items the exported model answers greedily in vLLM.
    probes: int = 4
    # vLLM (which serves a float32 checkpoint in bf16) and transformers in float32 must give the
    # probe answers' tokens the same log-probabilities, to this mean absolute difference in nats
    # per token; a mis-mapped weight or config shows as differences of whole nats.
    max_logprob_diff: float = 0.05


@dataclass
class HubConfig:
    """Push every finished round to the HF Hub (distill push does one by hand): the exported
    model to `repo_id`, branch round-NNN; the kept traces to `dataset_repo_id` when set. The
    token is the hub client's (HF_TOKEN or its login cache), never distill's."""

    repo_id: str = ""
    dataset_repo_id: str = ""
    private: bool = True


def validate(export: ExportConfig) -> None:
    """Raise ConfigError for the first bad value of the `export` section."""
    check_positive("export", export, ("probes", "max_logprob_diff"))
