"""VisA, Pareto long tail, 5 % noise, 90-degree rotation + flip tail augmentation.

Paper (Table 2, seeds 1-5): TailedCore 90.85, PatchCore 85.59, SoftPatch 86.56. VisA works
in its original layout (``split_csv/1cls.csv``) or converted to the MVTec layout.
"""

import dataclasses

from experiments.tailedcore.configs import mvtec_pareto


def get_config():
    return dataclasses.replace(mvtec_pareto.get_config(), dataset="visa", noise_ratio=0.05,
                               augmentation="rotflip")
