"""Per-round evaluation: held-out and benchmark accuracy, pass@k, majority vote, test-time scaling
and the grounding gap (stage.py), from pure scoring functions (scores.py)."""

from distill.eval.stage import eval_stage

__all__ = ["eval_stage"]
