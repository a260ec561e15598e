"""Recipes of ``python -m experiments.tailedcore``: ``--config <module name>``."""
