"""NAN (negative-aware norm) OOD benchmark (``python -m experiments.nan_ood``)."""
