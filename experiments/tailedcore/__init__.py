"""TailedCore vs PatchCore vs SoftPatch on a long-tail noisy benchmark (``python -m experiments.tailedcore``)."""
