"""VisA, step tail with K = 4, 5 % noise.

Paper (Table 2, seeds 1-5): TailedCore 89.64, PatchCore 76.85, SoftPatch 74.81.
"""

import dataclasses

from experiments.tailedcore.configs import visa_pareto


def get_config():
    return dataclasses.replace(visa_pareto.get_config(), setting="step_k4")
