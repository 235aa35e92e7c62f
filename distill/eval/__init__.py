"""Per-round evaluation: held-out and benchmark accuracy, pass@k, majority vote, test-time scaling
and the grounding gap (stage.py), from pure scoring functions (scores.py)."""
