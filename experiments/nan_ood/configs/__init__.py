"""Recipes of ``python -m experiments.nan_ood``: ``--config <module name>``."""
