"""Parallel architecture search over the GenNAS / NAS-Bench-Macro space.

    space      the 3^8 macro space: codes, the canonical key, the Keras builder
    proposers  random, regularized evolution, LLM (OpenAI-compatible chat completions)
    study      the shared Optuna study: claiming a candidate, dead-worker reaping, results
    __main__   the worker CLI: python -m chexnet_hvd.nas --study-dir DIR ...

Nothing here imports TensorFlow at module level: proposers, the study and tools/nas_report.py
run without it; candidates are trained by `python -m chexnet_hvd.train --model nas-<code>`.
"""
