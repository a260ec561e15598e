"""Benchmark results as files: JSON, CSV, markdown tables and PNG figures (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.common import markdown_table, pyplot, write_csv, write_json

__all__ = ["format_table", "write_results"]

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def format_table(results: dict) -> str:
    """Markdown table: per class and C_t / C_h / all, image AUROC / pixel AUROC / AUPRO."""
    methods = list(results["methods"])

    def fmt(d):
        return " / ".join("—" if np.isnan(d[k]) else f"{d[k]:.1f}" for k in _METRICS)

    rows = []
    for c in results["classes"]:
        row = [c, "yes" if c in results["tail_classes"] else ""]
        rows.append(row + [fmt(results["methods"][m]["per_class"][c]) for m in methods])
    for g in ("C_t", "C_h", "all"):
        rows.append([f"**{g}**", ""] + [fmt(results["methods"][m]["summary"][g]) for m in methods])
    head = ["class", "tail"] + [f"{m} img / pix / pro" for m in methods]
    return markdown_table(head, rows)


def _csv_rows(results: dict):
    for m, r in results["methods"].items():
        for c, v in r["per_class"].items():
            yield [m, c, int(c in results["tail_classes"])] + [v[k] for k in _METRICS]
        for g, v in r["summary"].items():
            yield [m, g, ""] + [v[k] for k in _METRICS]


def write_results(results: dict, out: str | Path, *, table: str) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and the figures into ``out``.

    Returns a mapping from artefact name to path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(out / "results.json",
                           {k: v for k, v in results.items() if k not in ("figures", "split")}),
        "csv": write_csv(out / "results.csv",
                         ["method", "class", "tail", *_METRICS], _csv_rows(results)),
        "markdown": out / "results.md",
    }
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


def _class_size_figure(plt, q: dict, path: Path) -> None:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _maps_figure(plt, results: dict, method: str, per_class: dict, path: Path) -> bool:
    split = results["split"]
    classes = [c for c in results["classes"] if c in per_class and per_class[c]["indices"]]
    if not classes:
        return False
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
            ax.imshow(np.clip(imgs[j] * _STD + _MEAN, 0, 1))
            ax.imshow(maps[j], cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
            if masks[j].any():
                ax.contour(masks[j], levels=[0.5], colors="white", linewidths=0.7)
            label = "defect" if split.test_labels[idx[j]] else "good"
            ax.set_title(f"{c} ({label})", fontsize=7)
    fig.suptitle(f"{method}: anomaly maps (white: ground truth)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(classes)))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _figures(results: dict, out: Path) -> dict[str, Path]:
    plt = pyplot()
    paths = {"class_sizes_png": out / "class_sizes.png"}
    _class_size_figure(plt, results["tailsampler"], paths["class_sizes_png"])
    if results.get("split") is None:
        return paths
    for method, per_class in (results.get("figures") or {}).items():
        p = out / f"anomaly_maps_{method}.png"
        if _maps_figure(plt, results, method, per_class, p):
            paths[f"maps_{method}_png"] = p
    return paths
