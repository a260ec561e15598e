"""MVTec AD, step tail: 60 % of the classes keep K = 4 training images; 10 % noise.

Paper (Table 1, seeds 1-5): TailedCore 95.71, PatchCore 83.83, SoftPatch 79.64.
"""

import dataclasses

from experiments.tailedcore.configs import mvtec_pareto


def get_config():
    return dataclasses.replace(mvtec_pareto.get_config(), setting="step_k4",
                               augmentation="rot15flip")
