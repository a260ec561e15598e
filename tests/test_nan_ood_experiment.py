"""End-to-end smoke test of ``python -m experiments.nan_ood`` at a tiny size (offline)."""

import json

import pytest

from experiments import nan_ood
from tailedcore_jax.train import LABEL_FREE_METHODS, OOD_METHODS

TINY = ["--epochs", "1", "--n-train", "4", "--n-test", "3", "--n-ood", "8", "--width", "4",
        "--image-size", "16", "--batch-size", "12", "--knn-k", "2", "--no-progress",
        "--ood-sets", "synthetic_heldout,gaussian_noise"]


def test_nan_ood_main_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    summary = nan_ood.main(TINY + ["--out", str(out)])
    for name in ("results.json", "results.csv", "results.md", "nan_hist.png", "config.json",
                 "train_log.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "classifier").is_dir() and (out / "train_ckpt" / "last").is_dir()
    saved = json.loads((out / "results.json").read_text())
    assert tuple(saved["metrics"]) == OOD_METHODS
    for m in OOD_METHODS:
        assert set(saved["metrics"][m]) == {"synthetic_heldout", "gaussian_noise", "average"}
        for v in saved["metrics"][m].values():
            assert 0.0 <= v["auroc"] <= 100.0 and 0.0 <= v["fpr"] <= 100.0
    assert 0.0 <= saved["id_accuracy"] <= 1.0
    assert summary["metrics"] == saved["metrics"]
    assert "NAN+ReAct+SSD" in (out / "results.md").read_text()
    assert "FeatureNorm" in capsys.readouterr().out  # the table is printed

    # label-free on the trained backbone (--checkpoint): feature scores only, no retraining
    lf = nan_ood.main(TINY + ["--out", str(tmp_path / "lf"), "--label-free",
                              "--checkpoint", str(out / "classifier")])
    assert tuple(lf["metrics"]) == LABEL_FREE_METHODS and lf["id_accuracy"] is None
    assert not (tmp_path / "lf" / "train_ckpt").exists()


def test_nan_ood_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown OOD set 'nope'"):
        nan_ood.main(TINY[:-2] + ["--ood-sets", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        nan_ood.main(["--dataset", "imagenet", "--out", str(tmp_path / "y")])
