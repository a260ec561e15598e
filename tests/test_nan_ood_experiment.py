"""``python -m experiments.nan_ood``: recipes, flags, and the job end to end at a tiny size
(offline), including the train-only entry point and label-free scoring."""

import json
import subprocess
import sys

import pytest

from experiments import common
from experiments.nan_ood import main as nan_ood
from experiments.nan_ood.evaluate import LABEL_FREE_METHODS, OOD_METHODS

PACKAGE = "experiments.nan_ood"
TINY = ["--epochs", "1", "--n-train", "4", "--n-test", "3", "--n-ood", "8", "--width", "4",
        "--image-size", "16", "--batch-size", "12", "--knn-k", "2", "--no-progress",
        "--ood-sets", "synthetic_heldout,gaussian_noise"]


@pytest.mark.parametrize("module", [PACKAGE, PACKAGE + ".train"])
def test_help_runs_as_a_module(tmp_path, module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--react-percentile" in res.stdout and "--config" in res.stdout


def test_cifar10_recipe_is_the_papers_setting():  # recipes and flags: test_experiment_tailedcore
    cfg = common.load_config(PACKAGE, "cifar10")
    assert (cfg.dataset, cfg.width, cfg.epochs, cfg.schedule, cfg.knn_k) == (
        "cifar10", 64, 100, "multistep", 50)
    assert 0.0 < cfg.react_percentile <= 1.0


def test_flags_override_the_recipe():
    cfg, args = nan_ood.parse_args(["--config", "cifar10", "--react-percentile", "0.95",
                                    "--ood-sets", "svhn, dtd", "--bf16", "--label-free", "on",
                                    "--max-train", "100", "--n-ood", "none", "--out", "o"])
    assert cfg.react_percentile == 0.95 and cfg.ood_sets == ("svhn", "dtd")
    assert cfg.bf16 and cfg.label_free and cfg.max_train == 100 and cfg.n_ood is None
    assert (cfg.dataset, cfg.epochs, cfg.width) == ("cifar10", 100, 64) and args.out == "o"


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
    # A regression: the average AUROC recorded for this tiny fixed-seed run (CPU).
    recorded = {"MSP": 29.8611, "NAN": 28.8194, "FeatureNorm": 29.1667, "KNN": 59.7222,
                "SSD": 74.6528, "NAN+KNN": 37.8472}
    for m, want in recorded.items():
        assert abs(saved["metrics"][m]["average"]["auroc"] - want) < 2e-3, m
    assert saved["config"]["react_percentile"] == 0.9
    assert "NAN+ReAct+SSD" in (out / "results.md").read_text()
    assert "FeatureNorm" in capsys.readouterr().out  # the table is printed

    # label-free on the trained backbone (--checkpoint): feature scores only, no retraining
    lf = nan_ood.main(TINY + ["--out", str(tmp_path / "lf"), "--label-free",
                              "--checkpoint", str(out / "classifier")])
    assert tuple(lf["metrics"]) == LABEL_FREE_METHODS and lf["id_accuracy"] is None
    assert not (tmp_path / "lf" / "train_ckpt").exists()


def test_train_only_then_the_full_job_reuses_the_training(tmp_path):
    out = tmp_path / "clf"
    argv = TINY + ["--epochs", "2", "--out", str(out)]
    part = nan_ood.train_main(argv + ["--stop-after-epoch", "1"])
    assert part == {"epochs_done": 1, "resumed_from_epoch": 0}
    assert not (out / "classifier").exists()
    done = nan_ood.train_main(argv)
    assert done["epochs_done"] == 2 and done["resumed_from_epoch"] == 1
    assert 0.0 <= done["test_accuracy"] <= 1.0 and (out / "classifier").is_dir()
    full = nan_ood.main(argv)  # same key and flags: resumes after the last epoch, no training
    assert full["id_accuracy"] == pytest.approx(done["test_accuracy"])
    log = [json.loads(s) for s in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_nan_ood_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown OOD set 'nope'"):
        nan_ood.main(TINY[:-2] + ["--ood-sets", "nope", "--out", str(tmp_path / "x")])
    for bad in (["--dataset", "imagenet"], ["--schedule", "exp"], ["--epochs", "1.5"]):
        with pytest.raises(SystemExit):
            nan_ood.main(bad + ["--out", str(tmp_path / "y")])
