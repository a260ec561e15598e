"""Train an image classifier (CIFAR ResNet-18 by default) with the OOD-literature recipe.

    python -m experiments.train_classifier --out runs/clf                    # synthetic, offline
    python -m experiments.train_classifier --dataset cifar10 --data-dir DIR \\
        --epochs 100 --width 64 --batch-size 128 --schedule multistep --out runs/cifar10_r18

SGD momentum 0.9, weight decay 5e-4 coupled as in ``torch.optim.SGD``, lr 0.1, random crop
(pad 4) + horizontal flip on device, multistep (x0.1 at 50/75/90 % of the epochs) or cosine
schedule, optional bf16 compute (``--bf16``). Writes ``OUT/train_log.jsonl`` (one JSON line
per epoch), ``OUT/train_ckpt/last`` after every epoch (rerun the same command to resume after
an interruption; ``--stop-after-epoch`` splits a run into jobs), and the final variables in
``OUT/classifier`` (load with ``tailedcore_jax.checkpoint.restore`` or
``python -m experiments.nan_ood --checkpoint OUT/classifier``). Library code:
:func:`tailedcore_jax.train.train_classifier`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tailedcore_jax import checkpoint
from tailedcore_jax import train as T
from tailedcore_jax.data import ood as D
from tailedcore_jax.models.resnet import ARCHITECTURES

log = logging.getLogger("train_classifier")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.train_classifier")
    p.add_argument("--dataset", default="synthetic", choices=D.ID_DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default="resnet18_cifar", choices=sorted(ARCHITECTURES))
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", default="cosine", choices=("multistep", "cosine", "constant"))
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--n-train", type=int, default=100, help="synthetic: images per class")
    p.add_argument("--max-train", type=int, default=None, help="TFDS: training subset")
    p.add_argument("--stop-after-epoch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/classifier")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    log.setLevel(logging.INFO)  # orbax/absl stay at WARNING
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("jax %s, backend %s, devices %s", jax.__version__, jax.default_backend(), jax.devices())
    (out / "config.json").write_text(json.dumps(vars(args), indent=1))
    data = D.load_id_dataset(args.dataset, data_dir=args.data_dir, image_size=args.image_size, seed=args.seed,
                             n_train_per_class=args.n_train, n_test_per_class=20, max_train=args.max_train,
                             max_test=2000)
    mean, std = T.channel_stats(data.train_images)
    model = ARCHITECTURES[args.arch](num_classes=data.num_classes, width=args.width)
    res = T.train_classifier(
        jax.random.key(args.seed), model, data.train_images, data.train_labels, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr, schedule=args.schedule, momentum=args.momentum,
        weight_decay=args.weight_decay, augment=not args.no_augment, mean=mean, std=std,
        compute_dtype=jnp.bfloat16 if args.bf16 else None, checkpoint_dir=out / "train_ckpt",
        log_path=out / "train_log.jsonl", stop_after_epoch=args.stop_after_epoch,
        progress=not args.no_progress, log_fn=lambda r: log.info("%s", json.dumps(r)),
    )
    summary = {"epochs_done": len(res.history), "resumed_from_epoch": res.resumed_from_epoch}
    if len(res.history) == args.epochs:
        checkpoint.save(out / "classifier", res.state.variables, overwrite=True)
        pred = T.predict(model, res.state.variables, data.test_images, mean=mean, std=std, taps=("logits",))
        summary["test_accuracy"] = float(np.mean(np.argmax(pred["logits"], -1) == data.test_labels))
        log.info("test accuracy %.2f %%", 100 * summary["test_accuracy"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
