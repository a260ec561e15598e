"""VisA, step tail with K = 1, 5 % noise.

Paper (Table 2, seeds 1-5): TailedCore 87.61, PatchCore 74.84, SoftPatch 69.92.
"""

import dataclasses

from experiments.tailedcore.configs import visa_pareto


def get_config():
    return dataclasses.replace(visa_pareto.get_config(), setting="step_k1")
