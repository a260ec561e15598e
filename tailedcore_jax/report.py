"""Write benchmark results: JSON, CSV, markdown and PNG figures (host side, matplotlib)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

__all__ = ["write_results"]

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _jsonable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("figures", "split")}


def write_results(results: dict, out: str | Path, *, table: str) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and the figures into ``out``.

    Returns a mapping from artefact name to path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1, default=float))
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "class", "tail", "image_auroc", "pixel_auroc", "aupro"])
        for m, r in results["methods"].items():
            for c, v in r["per_class"].items():
                w.writerow([m, c, int(c in results["tail_classes"]), v["image_auroc"],
                            v["pixel_auroc"], v["aupro"]])
            for g, v in r["summary"].items():
                w.writerow([m, g, "", v["image_auroc"], v["pixel_auroc"], v["aupro"]])
    q = results["tailsampler"]
    md = [
        "# Long-tail noisy anomaly detection",
        "",
        f"Config: `{json.dumps(results['config'], default=str)}`",
        "",
        "Image AUROC / pixel AUROC / AUPRO (x100).",
        "",
        table,
        "",
        f"TailSampler: {q['selected']} selected, missed tail {q['missed_tail_pct']:.1f} %, "
        f"anomalies among selected {q['selected_anomalies_pct']:.1f} %, class-size error "
        f"{q['class_size_rel_error_pct']:.1f} %.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()),
    ]
    paths["markdown"].write_text("\n".join(md) + "\n")
    try:
        paths.update(_figures(results, out))
    except ImportError:  # matplotlib missing: tables are still written
        pass
    return paths


def _figures(results: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    q = results["tailsampler"]
    true = np.asarray(q["true_class_sizes"])
    pred = np.asarray(q["predicted_class_sizes"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=true.shape)  # display only
    ax.scatter(true + jitter * true.clip(1) ** 0.5, pred, s=10, alpha=0.6)
    lim = max(true.max(), pred.max()) * 1.1 + 1
    ax.plot([0.8, lim], [0.8, lim], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true class size")
    ax.set_ylabel("predicted class size (TailSampler)")
    ax.set_title(f"TailSampler: {q['selected']} tail images selected")
    fig.tight_layout()
    paths["class_sizes_png"] = out / "class_sizes.png"
    fig.savefig(paths["class_sizes_png"], dpi=110)
    plt.close(fig)

    split = results.get("split")
    figs = results.get("figures") or {}
    if split is None or not figs:
        return paths
    for method, per_class in figs.items():
        classes = [c for c in results["classes"] if c in per_class and per_class[c]["indices"]]
        if not classes:
            continue
        cols = max(len(per_class[c]["indices"]) for c in classes)
        fig, axes = plt.subplots(len(classes), cols, figsize=(2.2 * cols, 2.2 * len(classes)),
                                 squeeze=False)
        for r, c in enumerate(classes):
            idx = np.asarray(per_class[c]["indices"])
            imgs, masks = split.load_test(idx)
            maps = per_class[c]["maps"]
            vmax = float(np.max(maps)) or 1.0
            for j in range(cols):
                ax = axes[r, j]
                ax.axis("off")
                if j >= len(idx):
                    continue
                img = np.clip(imgs[j] * _STD + _MEAN, 0, 1)
                ax.imshow(img)
                ax.imshow(maps[j], cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
                if masks[j].any():
                    ax.contour(masks[j], levels=[0.5], colors="white", linewidths=0.7)
                label = "defect" if split.test_labels[idx[j]] else "good"
                ax.set_title(f"{c} ({label})", fontsize=7)
        fig.suptitle(f"{method}: anomaly maps (white: ground truth)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(classes)))
        p = out / f"anomaly_maps_{method}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths[f"maps_{method}_png"] = p
    return paths
