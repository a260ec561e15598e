"""Feature-level long-tail noisy benchmark: PatchCore vs SoftPatch vs TailedCore.

Generated patch features (``tailedcore_jax.data.feature_mixture``): noisy head classes
(defective test images copied into training, the "overlap" protocol) and clean tail classes
of 1-4 images. Prints one JSON object with the image AUROC on tail classes (C_t), head
classes (C_h) and all classes, per method and seed, plus TailSampler quality and timings.

    python benchmarks/bench_tail_noise.py            # 3 seeds
    python benchmarks/bench_tail_noise.py --smoke    # 1 seed, smaller
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tailedcore_jax import memory, metrics  # noqa: E402
from tailedcore_jax.data.feature_mixture import augment_patches, long_tail_noisy_features  # noqa: E402
from tailedcore_jax.tailsampler import tail_sample_mask  # noqa: E402

METHODS = ("patchcore", "softpatch", "tailedcore")


def run_instance(seed: int, *, head_sizes, tail_sizes, copies: int) -> dict:
    data = long_tail_noisy_features(seed, head_sizes=head_sizes, tail_sizes=tail_sizes)
    key = jax.random.fold_in(jax.random.key(0), seed)
    t0 = time.perf_counter()
    tail, _ = tail_sample_mask(data.train_embeddings)
    tail = np.asarray(tail)
    t_tail = time.perf_counter() - t0
    true_tail = data.is_tail_class[data.train_class]
    aug = augment_patches(data.train_patches[tail], copies, seed=seed) if tail.any() else None
    out = {
        "seed": seed,
        "train_images": int(data.train_patches.shape[0]),
        "tailsampler": {
            "selected": int(tail.sum()),
            "true_tail": int(true_tail.sum()),
            "missed_tail_pct": float(100 * (true_tail & ~tail).sum() / max(true_tail.sum(), 1)),
            "selected_noise": int((tail & data.train_is_noise).sum()),
            "seconds": round(t_tail, 3),
        },
    }
    fits = {
        "patchcore": lambda: memory.fit_patchcore(key, data.train_patches),
        "softpatch": lambda: memory.fit_softpatch(key, data.train_patches),
        "tailedcore": lambda: memory.fit_tailedcore(
            key, data.train_patches, data.train_embeddings, tail_mask=tail,
            augmented_tail_features=aug),
    }
    for name in METHODS:
        t0 = time.perf_counter()
        bank = jax.block_until_ready(fits[name]())
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, _ = jax.block_until_ready(memory.score(bank, data.test_patches))
        t_score = time.perf_counter() - t0
        scores = np.asarray(scores)
        per_class = np.array([
            float(metrics.auroc(scores[data.test_class == c], data.test_labels[data.test_class == c]))
            for c in range(len(data.class_sizes))
        ])
        out[name] = {
            "auroc_tail": round(100 * per_class[data.is_tail_class].mean(), 2),
            "auroc_head": round(100 * per_class[~data.is_tail_class].mean(), 2),
            "auroc_all": round(100 * per_class.mean(), 2),
            "memory_rows": int(np.asarray(bank.mask).sum()),
            "fit_s": round(t_fit, 2),
            "score_s": round(t_score, 3),
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one small seed (CI)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--copies", type=int, default=23, help="augmented copies per tail image")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    head, tail_sizes, seeds = (40, 40, 40), (1, 2, 3, 4), range(args.seeds)
    if args.smoke:
        head, seeds = (30, 30, 30), range(1)
    runs = [run_instance(s, head_sizes=head, tail_sizes=tail_sizes, copies=args.copies) for s in seeds]
    summary = {
        m: {k: round(float(np.mean([r[m][k] for r in runs])), 2) for k in ("auroc_tail", "auroc_head", "auroc_all")}
        for m in METHODS
    }
    base = max(summary["patchcore"]["auroc_all"], summary["softpatch"]["auroc_all"])
    report = {
        "benchmark": "tail_noise",
        "backend": jax.default_backend(),
        "head_sizes": list(head),
        "tail_sizes": list(tail_sizes),
        "mean": summary,
        "tailedcore_minus_best_baseline_all": round(summary["tailedcore"]["auroc_all"] - base, 2),
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
