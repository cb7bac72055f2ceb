"""Evaluation: HumanEval pass@k with sandboxed execution, and line completion on held-out files.

- `humaneval`: BigCode-harness generation (resumable, seeded, torchrun-sharded) and scoring.
- `execution` / `sandbox_child`: running untrusted programs under OS-level isolation.
- `passk`: the unbiased pass@k estimator.
- `lines`: CodeXGLUE-style line completion (exact match, edit similarity) with a baseline.
"""
