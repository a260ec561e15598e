"""NAN (negative-aware norm) OOD benchmark: train a classifier, score ID vs OOD sets.

    python -m experiments.nan_ood --out runs/nan_ood    # offline default (recipe synthetic), ~3-4 min on 2 CPU cores
    python -m experiments.nan_ood --label-free          # random-init backbone + BN recalibration, no labels
    python -m experiments.nan_ood --config cifar10 --data-dir ~/tensorflow_datasets   # the paper's Table 3 setting (GPU)
    python -m experiments.nan_ood.train --out runs/clf  # train the classifier only

Prints per-OOD-set and average AUROC / FPR95 and the ID accuracy for MSP, Energy, MaxLogit,
KL, Mahalanobis, FeatureNorm (L1), NAN, KNN, SSD and the NAN combinations (like the paper's
Tables 1 and 3) and writes into ``--out``: ``results.json``, ``results.csv``, ``results.md``,
``nan_hist.png`` (NAN of ID test vs each OOD set), ``config.json``, ``train_log.jsonl``,
the training checkpoint ``train_ckpt/last`` (rerunning the same command resumes it) and the
final classifier ``classifier/`` (reuse it with ``--checkpoint OUT/classifier``). The
train-only command writes the same training files plus ``summary.json``; the full command
on the same ``--out`` and flags then reuses its training.

Every field of :class:`~experiments.nan_ood.config.NanOodConfig` is a flag (``--epochs 3``,
``--ood-sets svhn,dtd``, ``--react-percentile 0.95``, ``--bf16``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (jax_banner, markdown_table, parse_flags, pyplot, write_csv,
                                write_json)
from experiments.nan_ood import evaluate as E
from experiments.nan_ood import train as T
from experiments.nan_ood.config import NanOodConfig
from tailedcore_jax import checkpoint
from tailedcore_jax.data import ood as D
from tailedcore_jax.models.batchnorm import recalibrate_batch_norm
from tailedcore_jax.models.resnet import ARCHITECTURES

log = logging.getLogger("nan_ood")


def parse_args(argv=None, *, prog: str = "python -m experiments.nan_ood",
               out: str = "runs/nan_ood") -> tuple[NanOodConfig, object]:
    """(config, namespace with ``out``) from the command line."""
    def runtime(p):
        p.add_argument("--out", default=out, help="output directory (default: %(default)s)")

    return parse_flags(argv, package="experiments.nan_ood", prog=prog,
                       description=__doc__.split("\n\n")[0], extra=runtime)


def _start(cfg: NanOodConfig, out: Path) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        stream=sys.stdout, force=True)
    log.setLevel(logging.INFO)  # orbax/absl stay at WARNING
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s", jax_banner())
    write_json(out / "config.json", {**dataclasses.asdict(cfg), "out": os.fspath(out)})


def load_id_data(cfg: NanOodConfig) -> D.ClassificationData:
    return D.load_id_dataset(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                             seed=cfg.seed, n_train_per_class=cfg.n_train,
                             n_test_per_class=cfg.n_test, max_train=cfg.max_train,
                             max_test=cfg.max_test, recolour=cfg.recolour)


def load_ood_data(cfg: NanOodConfig) -> dict[str, np.ndarray]:
    names = list(cfg.ood_sets) if cfg.ood_sets else list(D.DEFAULT_OOD_SETS[cfg.dataset])
    if cfg.dataset in names:
        raise ValueError(f"OOD set {cfg.dataset!r} is the in-distribution dataset")
    return D.load_ood_sets(names, data_dir=cfg.data_dir, image_size=cfg.image_size,
                           num=cfg.n_ood, seed=cfg.seed + 1, recolour=cfg.recolour)


def build_model(cfg: NanOodConfig, num_classes: int | None):
    return ARCHITECTURES[cfg.arch](num_classes=num_classes, width=cfg.width,
                                   dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32)


def train(cfg: NanOodConfig, key, model, data, mean, std, out: Path) -> T.TrainResult:
    """Train (or resume) the classifier; ``out/classifier`` holds it once training is done."""
    res = T.train_classifier(
        key, model, data.train_images, data.train_labels, epochs=cfg.epochs,
        batch_size=cfg.batch_size, learning_rate=cfg.lr, schedule=cfg.schedule,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, augment=cfg.augment,
        mean=mean, std=std, checkpoint_dir=out / "train_ckpt", log_path=out / "train_log.jsonl",
        stop_after_epoch=cfg.stop_after_epoch, progress=cfg.progress,
        log_fn=lambda r: log.info("train %s", json.dumps(r)),
    )
    if res.epochs_done == cfg.epochs:
        checkpoint.save(out / "classifier", res.state.variables, overwrite=True)
    return res


def model_variables(cfg: NanOodConfig, keys, model, data, mean, std, out: Path):
    """Backbone variables: loaded (``checkpoint``), random with BatchNorm recalibrated on the
    ID training images (``label_free``), or trained. Returns ``(variables, epochs trained)``;
    ``variables`` is None while training is incomplete (``stop_after_epoch``)."""
    key_train, key_init = keys
    sample = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    if cfg.checkpoint:
        like = jax.eval_shape(lambda k: model.init(k, sample), key_init)
        log.info("loading classifier from %s", cfg.checkpoint)
        return checkpoint.restore(cfg.checkpoint, like=like), 0
    if cfg.label_free:
        variables = model.init(key_init, sample)
        normalize = functools.partial(T.normalize_images, mean=mean, std=std)
        return recalibrate_batch_norm(model, variables, data.train_images, batch_size=128,
                                      preprocess=normalize), 0
    res = train(cfg, key_train, model, data, mean, std, out)
    if res.epochs_done < cfg.epochs:
        log.info("stopped after epoch %d of %d; rerun to resume", res.epochs_done, cfg.epochs)
        return None, res.epochs_done
    return res.state.variables, res.epochs_done


def ood_scores(cfg: NanOodConfig, key, train_sets, eval_sets, data):
    """(scores, metrics) of every method, the ID test set named ``"ID"``."""
    scores = E.ood_method_scores(
        key, train_sets["pooled"], {n: (s["pooled"], s.get("logits")) for n, s in eval_sets.items()},
        train_labels=None if cfg.label_free else data.train_labels,
        num_classes=None if cfg.label_free else data.num_classes,
        methods=list(E.LABEL_FREE_METHODS) if cfg.label_free else None,
        knn_k=cfg.knn_k, ssd_clusters=cfg.ssd_clusters, react_percentile=cfg.react_percentile,
    )
    return scores, E.ood_metrics(scores, "ID")


def _table_text(metrics, acc, ood_names, fmt="md"):
    head = ["method"] + list(ood_names) + ["average", "ID acc"]
    rows = []
    for m, r in metrics.items():
        cells = [f"{r[n]['auroc']:.1f} / {r[n]['fpr']:.1f}" for n in list(ood_names) + ["average"]]
        rows.append([m] + cells + ["-" if acc is None else f"{100 * acc:.1f}"])
    if fmt == "md":
        return markdown_table(head, rows)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def _histogram(path, nan_scores, id_name):
    plt = pyplot()
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


def write_outputs(out: Path, summary: dict, scores, title: str) -> None:
    metrics, acc, ood_names = summary["metrics"], summary["id_accuracy"], summary["ood_sets"]
    write_json(out / "results.json", summary)
    write_csv(out / "results.csv", ["method", "ood_set", "auroc", "fpr95", "id_accuracy"],
              ([m, n, f"{v['auroc']:.4f}", f"{v['fpr']:.4f}",
                "" if acc is None else f"{100 * acc:.4f}"]
               for m, r in metrics.items() for n, v in r.items()))
    (out / "results.md").write_text(f"# {title}\n\n{_table_text(metrics, acc, ood_names)}\n")
    _histogram(out / "nan_hist.png", {n: np.asarray(scores["NAN"][n]) for n in ["ID"] + ood_names},
               "ID")


def main(argv=None) -> dict:
    cfg, args = parse_args(argv)
    out = Path(args.out)
    _start(cfg, out)
    t_start = time.perf_counter()
    key_train, key_init, key_ssd = jax.random.split(jax.random.key(cfg.seed), 3)
    data, ood = load_id_data(cfg), load_ood_data(cfg)
    ood_names = list(ood)
    log.info("ID %s: %d train / %d test images, %d classes; OOD: %s", data.name,
             len(data.train_images), len(data.test_images), data.num_classes,
             {k: len(v) for k, v in ood.items()})
    mean, std = T.channel_stats(data.train_images)
    with_head = not cfg.label_free or cfg.checkpoint is not None
    model = build_model(cfg, data.num_classes if with_head else None)
    variables, epochs_done = model_variables(cfg, (key_train, key_init), model, data, mean, std,
                                             out)
    if variables is None:
        return {"epochs_done": epochs_done}
    t_train = time.perf_counter() - t_start

    taps = ("pooled",) if cfg.label_free else ("pooled", "logits")
    feats = functools.partial(T.predict, model, variables, mean=mean, std=std, taps=taps)
    tr = feats(data.train_images)
    sets = {"ID": feats(data.test_images), **{n: feats(x) for n, x in ood.items()}}
    acc = None
    if "logits" in taps:
        acc = float(np.mean(np.argmax(sets["ID"]["logits"], -1) == data.test_labels))
        log.info("ID test accuracy %.2f %%", 100 * acc)
    scores, metrics = ood_scores(cfg, key_ssd, tr, sets, data)
    pooled_id = sets["ID"]["pooled"]
    summary = {
        "config": {**dataclasses.asdict(cfg), "out": os.fspath(out)},
        "jax": {"version": jax.__version__, "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()]},
        "id_dataset": data.name, "ood_sets": ood_names, "id_accuracy": acc,
        "feature_dim": int(pooled_id.shape[1]),
        "mean_active_fraction_id": float(np.mean(pooled_id > 0)),
        "metrics": metrics,
        "seconds": {"train_or_load": round(t_train, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    title = f"AUROC / FPR95 (%), ID = {data.name}" + (" (label-free)" if cfg.label_free else "")
    write_outputs(out, summary, scores, title)
    print(f"\n{title}\n" + _table_text(metrics, acc, ood_names, "txt"), flush=True)
    log.info("wrote %s (%.1f s total)", os.fspath(out), summary["seconds"]["total"])
    return summary


def train_main(argv=None) -> dict:
    """``python -m experiments.nan_ood.train``: the training stage alone (same flags).

    Writes ``train_log.jsonl``, ``train_ckpt/last``, ``classifier/`` once all epochs are
    done, and ``summary.json`` (epochs done, test accuracy).
    """
    cfg, args = parse_args(argv, prog="python -m experiments.nan_ood.train", out="runs/classifier")
    out = Path(args.out)
    _start(cfg, out)
    key_train, _, _ = jax.random.split(jax.random.key(cfg.seed), 3)
    data = load_id_data(cfg)
    mean, std = T.channel_stats(data.train_images)
    model = build_model(cfg, data.num_classes)
    res = train(cfg, key_train, model, data, mean, std, out)
    summary = {"epochs_done": res.epochs_done, "resumed_from_epoch": res.resumed_from_epoch}
    if res.epochs_done == cfg.epochs:
        pred = T.predict(model, res.state.variables, data.test_images, mean=mean, std=std,
                         taps=("logits",))
        summary["test_accuracy"] = float(np.mean(np.argmax(pred["logits"], -1) == data.test_labels))
        log.info("test accuracy %.2f %%", 100 * summary["test_accuracy"])
    write_json(out / "summary.json", summary)
    return summary
