"""Evaluation: held-out loss during training (heldout.py), log-likelihoods through the serving
engine (scoring.py), the lm-evaluation-harness adapter (harness.py, needs the `eval` extra) and
`lmsys eval` (runner.py). Nothing here is imported by `import lmsys`."""
