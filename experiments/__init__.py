"""Experiment packages built on tailedcore_jax: ``python -m experiments.tailedcore`` and
``python -m experiments.nan_ood``. Each has recipes in ``configs/`` (plain Python, one
``get_config()`` per file) whose every field is a command-line flag."""
