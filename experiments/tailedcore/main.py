"""TailedCore vs PatchCore vs SoftPatch on a long-tail noisy benchmark.

Offline default (recipe ``synthetic``): the embedded synthetic dataset, Pareto long tail,
10 % noise, a random ResNet-18 with BatchNorm recalibration (loudly flagged):

    python -m experiments.tailedcore --out runs/tailedcore

The paper's protocol (TailedCore, CVPR 2025, Tables 1-4) with real data and weights:

    python -m experiments.tailedcore --dataset mvtec --data-root /data/mvtec_anomaly_detection \
        --manifest-dir /data/tailedcore-manifests --setting pareto --seed 1 \
        --weights /weights/wide_resnet50_2-95faca4d.pth --out runs/mvtec_pareto_s1

or, with the recipe written out in ``configs/mvtec_pareto.py``:

    python -m experiments.tailedcore --config mvtec_pareto --data-root ... --manifest-dir ... \
        --weights ... --seed 1 --out runs/mvtec_pareto_s1

Every field of :class:`~experiments.tailedcore.config.TailedCoreConfig` is a flag
(``--lof-k 3``, ``--patch-layers layer2,layer3``, ``--bn-recalibration off``, ...);
``--help`` lists them with the chosen recipe's values.
"""

from __future__ import annotations

import time

from experiments.common import parse_flags
from experiments.tailedcore import pipeline, report
from experiments.tailedcore.config import TailedCoreConfig

PROG = "python -m experiments.tailedcore"


def _runtime_flags(p) -> None:
    p.add_argument("--out", default="runs/tailedcore", help="output directory (default: %(default)s)")


def parse_args(argv=None) -> tuple[TailedCoreConfig, object]:
    """(config, namespace with ``out``) from the command line."""
    return parse_flags(argv, package="experiments.tailedcore", prog=PROG,
                       description=__doc__.splitlines()[0], extra=_runtime_flags)


def main(argv=None) -> dict:
    cfg, args = parse_args(argv)
    t0 = time.perf_counter()
    results = pipeline.run(cfg, args.out)
    table = report.format_table(results)
    paths = report.write_results(results, args.out, table=table)
    print("\nImage AUROC / pixel AUROC / AUPRO (x100):\n")
    print(table)
    print("\nTimings (s):", ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))
    print(f"Total {time.perf_counter() - t0:.0f} s. Written:", ", ".join(str(p) for p in paths.values()))
    return results
