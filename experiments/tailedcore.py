"""Main job: TailedCore vs PatchCore vs SoftPatch on a long-tail noisy benchmark.

Offline default (no arguments): the embedded synthetic dataset, Pareto long tail, 10 % noise,
a random ResNet-18 with BatchNorm recalibration (loudly flagged):

    python -m experiments.tailedcore

The paper's protocol (TailedCore, CVPR 2025, Tables 1-4) with real data and weights:

    python -m experiments.tailedcore --dataset mvtec --data-root /data/mvtec_anomaly_detection \
        --manifest-dir /data/tailedcore-manifests --setting pareto --seed 1 \
        --weights /weights/wide_resnet50_2-95faca4d.pth --out runs/mvtec_pareto_s1

Thin driver: flags -> TailedCoreConfig -> tailedcore_jax.runner.run -> tables and figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tailedcore_jax import report, runner


def parse_args(argv=None) -> tuple[runner.TailedCoreConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic", choices=runner.DATASETS)
    p.add_argument("--data-root", default=None, help="MVTec AD / VisA root folder")
    p.add_argument("--setting", default="pareto", choices=runner.SETTINGS)
    p.add_argument("--noise-ratio", type=float, default=None,
                   help="injected defects per head class (default 0.1 MVTec/synthetic, 0.05 VisA)")
    p.add_argument("--seed", type=int, default=0, help="dataset/split seed (manifest seedNN)")
    p.add_argument("--manifest-dir", default=None, help="official split manifests root")
    p.add_argument("--weights", default=None,
                   help="torchvision/timm WideResNet-50-2 weights (.pth/.safetensors/.npz)")
    p.add_argument("--arch", default=None, help="backbone (default wide_resnet50_2 with weights, "
                   "resnet18 without)")
    p.add_argument("--image-size", type=int, default=None, help="crop size (224 / 128)")
    p.add_argument("--resize", type=int, default=None, help="resize before crop (256 / 146)")
    p.add_argument("--patch-layers", default="layer2,layer3")
    p.add_argument("--embedding-layer", default=None,
                   help="TailSampler embedding: pooled (layer4) or layer3 (random default)")
    p.add_argument("--bn-recalibration", default=None, choices=["on", "off"])
    p.add_argument("--augmentation", default=None,
                   choices=["none", "rotflip", "rot15flip", "rot30flip", "rot45flip"])
    p.add_argument("--methods", default=",".join(runner.METHODS))
    p.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    p.add_argument("--nan-normalise", action="store_true",
                   help="also report image scores divided by the NAN of the test embedding")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-pixels", action="store_true", help="skip maps, pixel AUROC, AUPRO")
    p.add_argument("--out", default="runs/tailedcore", help="output directory")
    a = p.parse_args(argv)
    cfg = runner.TailedCoreConfig(
        dataset=a.dataset, data_root=a.data_root, setting=a.setting, noise_ratio=a.noise_ratio,
        seed=a.seed, manifest_dir=a.manifest_dir, weights=a.weights, arch=a.arch,
        image_size=a.image_size, resize=a.resize,
        patch_layers=tuple(s for s in a.patch_layers.split(",") if s),
        embedding_layer=a.embedding_layer,
        bn_recalibration=None if a.bn_recalibration is None else a.bn_recalibration == "on",
        augmentation=a.augmentation, methods=tuple(s for s in a.methods.split(",") if s),
        ratio=a.ratio, batch_size=a.batch_size, nan_normalise=a.nan_normalise,
    )
    return cfg, a


def main(argv=None) -> dict:
    cfg, args = parse_args(argv)
    t0 = time.perf_counter()
    results = runner.run(cfg, args.out, with_pixels=not args.no_pixels)
    table = runner.format_table(results)
    paths = report.write_results(results, args.out, table=table)
    print("\nImage AUROC / pixel AUROC / AUPRO (x100):\n")
    print(table)
    print("\nTimings (s):", ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))
    print(f"Total {time.perf_counter() - t0:.0f} s. Written:", ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
