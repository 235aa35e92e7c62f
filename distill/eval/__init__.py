"""Per-round evaluation: held-out and benchmark accuracy, pass@k, majority vote, test-time scaling
and the grounding gap (stage.py), from pure scoring functions (scores.py).

Import the stage from distill.eval.stage: this package imports nothing, since loading a config
imports its `eval` section (config.py) and must not start the stage, which imports the config."""
