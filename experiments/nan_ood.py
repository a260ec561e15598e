"""NAN (negative-aware norm) OOD benchmark: train a classifier, score ID vs OOD sets.

    python -m experiments.nan_ood                       # offline default (synthetic), ~3-4 min on 2 CPU cores
    python -m experiments.nan_ood --label-free          # random-init backbone + BN recalibration, no labels
    python -m experiments.nan_ood --dataset cifar10 --data-dir ~/tensorflow_datasets \\
        --epochs 100 --width 64 --batch-size 128        # the paper's Table 3 setting (GPU)

Prints per-OOD-set and average AUROC / FPR95 and the ID accuracy for MSP, Energy, MaxLogit,
KL, Mahalanobis, FeatureNorm (L1), NAN, KNN, SSD and the NAN combinations (like the paper's
Tables 1 and 3) and writes into ``--out``: ``results.json``, ``results.csv``, ``results.md``,
``nan_hist.png`` (NAN of ID test vs each OOD set), ``config.json``, ``train_log.jsonl``,
the training checkpoint ``train_ckpt/last`` (rerunning the same command resumes it) and the
final classifier ``classifier/`` (reuse it with ``--checkpoint OUT/classifier``).

Thin driver: data in :mod:`tailedcore_jax.data.ood`, training and score evaluation in
:mod:`tailedcore_jax.train`, scores in :mod:`tailedcore_jax.ood`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tailedcore_jax import checkpoint
from tailedcore_jax import train as T
from tailedcore_jax.data import ood as D
from tailedcore_jax.models.resnet import ARCHITECTURES

log = logging.getLogger("nan_ood")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.nan_ood", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", choices=D.ID_DATASETS)
    p.add_argument("--ood-sets", default=None,
                   help="comma-separated OOD sets (default depends on --dataset; known: "
                        + ", ".join(D.KNOWN_OOD_SETS) + ")")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (CIFAR/SVHN/DTD/Places/LSUN)")
    p.add_argument("--arch", default="resnet18_cifar", choices=sorted(ARCHITECTURES))
    p.add_argument("--width", type=int, default=32, help="base width (64 = standard ResNet-18)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", default="cosine", choices=("multistep", "cosine", "constant"))
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters")
    p.add_argument("--n-train", type=int, default=100, help="synthetic: training images per class")
    p.add_argument("--n-test", type=int, default=50, help="synthetic: ID test images per class")
    p.add_argument("--recolour", action="store_true",
                   help="synthetic: random channel permutation/gain per image (colour no longer gives the class)")
    p.add_argument("--n-ood", type=int, default=300, help="images per OOD set (TFDS: random subset)")
    p.add_argument("--max-train", type=int, default=None, help="TFDS: subset of the training split")
    p.add_argument("--max-test", type=int, default=None, help="TFDS: subset of the test split")
    p.add_argument("--knn-k", type=int, default=10, help="KNN neighbour rank (paper/OpenOOD: 50 on CIFAR)")
    p.add_argument("--ssd-clusters", type=int, default=1)
    p.add_argument("--react-percentile", type=float, default=90.0)
    p.add_argument("--label-free", action="store_true",
                   help="no labels, no head: random-init backbone (or --checkpoint's) with BN recalibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="classifier variables to load instead of training")
    p.add_argument("--out", default="runs/nan_ood")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _table_text(metrics, acc, ood_names, fmt="md"):
    head = ["method"] + list(ood_names) + ["average", "ID acc"]
    rows = []
    for m, r in metrics.items():
        cells = [f"{r[n]['auroc']:.1f} / {r[n]['fpr']:.1f}" for n in list(ood_names) + ["average"]]
        rows.append([m] + cells + ["-" if acc is None else f"{100 * acc:.1f}"])
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def _histogram(path, nan_scores, id_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    allv = np.concatenate(list(nan_scores.values()))
    bins = np.linspace(allv.min(), allv.max(), 50)
    for name, v in nan_scores.items():
        ax.hist(v, bins=bins, alpha=0.5 if name == id_name else 0.35, density=True,
                label=f"{name} (in-distribution)" if name == id_name else name,
                histtype="stepfilled" if name == id_name else "step", linewidth=1.5)
    ax.set_xlabel("NAN = ||a||_1 / #(a > 0)  (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    log.setLevel(logging.INFO)  # orbax/absl stay at WARNING
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("jax %s, backend %s, devices %s", jax.__version__, jax.default_backend(), jax.devices())
    (out / "config.json").write_text(json.dumps(vars(args), indent=1))
    t_start = time.perf_counter()
    key = jax.random.key(args.seed)
    key_train, key_init, key_ssd = jax.random.split(key, 3)

    # ---- data
    data = D.load_id_dataset(args.dataset, data_dir=args.data_dir, image_size=args.image_size, seed=args.seed,
                             n_train_per_class=args.n_train, n_test_per_class=args.n_test,
                             max_train=args.max_train, max_test=args.max_test, recolour=args.recolour)
    ood_names = (args.ood_sets.split(",") if args.ood_sets else list(D.DEFAULT_OOD_SETS[args.dataset]))
    ood_names = [n.strip() for n in ood_names if n.strip()]
    if args.dataset in ood_names:
        raise ValueError(f"OOD set {args.dataset!r} is the in-distribution dataset")
    ood = D.load_ood_sets(ood_names, data_dir=args.data_dir, image_size=args.image_size, num=args.n_ood,
                          seed=args.seed + 1, recolour=args.recolour)
    log.info("ID %s: %d train / %d test images, %d classes; OOD: %s", data.name, len(data.train_images),
             len(data.test_images), data.num_classes, {k: len(v) for k, v in ood.items()})
    mean, std = T.channel_stats(data.train_images)

    # ---- model
    build = ARCHITECTURES[args.arch]
    num_classes = None if args.label_free and args.checkpoint is None else data.num_classes
    model = build(num_classes=num_classes, width=args.width,
                  dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    if args.checkpoint:
        like = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, args.image_size, args.image_size, 3))), key_init)
        variables = checkpoint.restore(args.checkpoint, like=like)
        log.info("loaded classifier from %s", args.checkpoint)
    elif args.label_free:
        variables = model.init(key_init, jnp.zeros((1, args.image_size, args.image_size, 3)))
    else:
        res = T.train_classifier(
            key_train, model, data.train_images, data.train_labels, epochs=args.epochs,
            batch_size=args.batch_size, learning_rate=args.lr, schedule=args.schedule,
            weight_decay=args.weight_decay, mean=mean, std=std,
            checkpoint_dir=out / "train_ckpt", log_path=out / "train_log.jsonl",
            progress=not args.no_progress, log_fn=lambda r: log.info("train %s", json.dumps(r)),
        )
        variables = res.state.variables
        checkpoint.save(out / "classifier", variables, overwrite=True)
    if args.label_free and not args.checkpoint:
        # label-free, random init: BN statistics recalibrated on the ID training images
        variables = T.recalibrate_batch_stats(model, variables, data.train_images, mean=mean, std=std)
    t_train = time.perf_counter() - t_start

    # ---- features
    taps = ("pooled",) if args.label_free else ("pooled", "logits")

    def feats(x):
        return T.predict(model, variables, x, mean=mean, std=std, taps=taps)

    tr = feats(data.train_images)
    sets = {"ID": feats(data.test_images)}
    for n, x in ood.items():
        sets[n] = feats(x)
    acc = None
    if "logits" in taps:
        acc = float(np.mean(np.argmax(sets["ID"]["logits"], -1) == data.test_labels))
        log.info("ID test accuracy %.2f %%", 100 * acc)

    # ---- scores and metrics
    methods = list(T.LABEL_FREE_METHODS) if args.label_free else None
    scores = T.ood_method_scores(
        key_ssd, tr["pooled"], {n: (s["pooled"], s.get("logits")) for n, s in sets.items()},
        train_labels=None if args.label_free else data.train_labels,
        num_classes=None if args.label_free else data.num_classes, methods=methods,
        knn_k=args.knn_k, ssd_clusters=args.ssd_clusters, react_percentile=args.react_percentile,
    )
    metrics = T.ood_metrics(scores, "ID")
    pooled_id = sets["ID"]["pooled"]
    summary = {
        "config": vars(args),
        "jax": {"version": jax.__version__, "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()]},
        "id_dataset": data.name, "ood_sets": ood_names, "id_accuracy": acc,
        "feature_dim": int(pooled_id.shape[1]),
        "mean_active_fraction_id": float(np.mean(pooled_id > 0)),
        "metrics": metrics,
        "seconds": {"train_or_load": round(t_train, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "ood_set", "auroc", "fpr95", "id_accuracy"])
        for m, r in metrics.items():
            for n, v in r.items():
                w.writerow([m, n, f"{v['auroc']:.4f}", f"{v['fpr']:.4f}", "" if acc is None else f"{100 * acc:.4f}"])
    md = _table_text(metrics, acc, ood_names, "md")
    title = f"AUROC / FPR95 (%), ID = {data.name}" + (" (label-free)" if args.label_free else "")
    (out / "results.md").write_text(f"# {title}\n\n{md}\n")
    _histogram(out / "nan_hist.png", {n: np.asarray(scores["NAN"][n]) for n in ["ID"] + ood_names}, "ID")
    print(f"\n{title}\n" + _table_text(metrics, acc, ood_names, "txt"), flush=True)
    log.info("wrote %s (%.1f s total)", os.fspath(out), summary["seconds"]["total"])
    return summary


if __name__ == "__main__":
    main()
