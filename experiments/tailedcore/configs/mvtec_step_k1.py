"""MVTec AD, step tail: 60 % of the classes keep K = 1 training image; 10 % noise.

Paper (Table 1, seeds 1-5): TailedCore 94.43, PatchCore 80.01, SoftPatch 75.40.
"""

import dataclasses

from experiments.tailedcore.configs import mvtec_step_k4


def get_config():
    return dataclasses.replace(mvtec_step_k4.get_config(), setting="step_k1")
