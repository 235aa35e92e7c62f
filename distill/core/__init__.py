"""The core every stage builds on: the run directory, atomic files, seeds, prompt text, the rows
stages exchange. It imports nothing of distill above it (tests/test_layout.py checks)."""
