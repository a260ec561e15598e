"""``python -m experiments.tailedcore``: recipes, flags, and the main job end to end at a tiny
size (offline, every artefact written, a rerun resumes from the cache)."""

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import common
from experiments.nan_ood.config import NanOodConfig
from experiments.tailedcore import main as tailedcore
from experiments.tailedcore.config import TailedCoreConfig

PACKAGE = "experiments.tailedcore"
RECIPES = ("synthetic", "mvtec_pareto", "mvtec_step_k4", "mvtec_step_k1", "visa_pareto",
           "visa_step_k4", "visa_step_k1")


def test_help_runs_as_a_module(tmp_path):
    # from another directory: the installed package, not the checkout's cwd
    res = subprocess.run([sys.executable, "-m", PACKAGE, "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--lof-drop" in res.stdout and "--config" in res.stdout


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_resolves(name):
    cfg = common.load_config(PACKAGE, name)
    assert isinstance(cfg, TailedCoreConfig)
    if cfg.dataset != "synthetic":
        cfg = dataclasses.replace(cfg, data_root="/data", weights="w.pth")
        assert cfg.resolved().arch == "wide_resnet50_2" and not cfg.resolved().bn_recalibration
    resolved = cfg.resolved()
    assert resolved.augmentation and resolved.image_size and resolved.noise_ratio


# experiments.common, for both experiment packages
@pytest.mark.parametrize("package, cls, recipes", [
    (PACKAGE, TailedCoreConfig, RECIPES),
    ("experiments.nan_ood", NanOodConfig, ("synthetic", "cifar10")),
])
def test_recipes_and_flags_of_both_experiments(package, cls, recipes):
    assert sorted(common.available_configs(package)) == sorted(recipes)
    for name in recipes:
        assert isinstance(common.load_config(package, name), cls)
    assert common.load_config(package, "synthetic") == cls()  # the default is the recipe
    parser = common.config_parser(cls(), prog="p", description="", package=package,
                                  config_name="synthetic")
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def test_parse_bool():
    for text, want in (("on", True), ("TRUE", True), ("1", True), ("off", False), ("no", False)):
        assert common.parse_bool(text) is want
    with pytest.raises(argparse.ArgumentTypeError):
        common.parse_bool("maybe")


def test_flags_override_the_recipe():
    cfg, args = tailedcore.parse_args(
        ["--config", "mvtec_step_k1", "--lof-k", "3", "--lof-drop", "0.2", "--model-seed", "1",
         "--patch-layers", "layer1,layer3", "--bn-recalibration", "on", "--no-pixels",
         "--nan-normalize", "--noise-ratio", "none", "--augmentation", "none", "--out", "o"])
    assert (cfg.lof_k, cfg.lof_drop, cfg.model_seed) == (3, 0.2, 1)
    assert cfg.patch_layers == ("layer1", "layer3") and cfg.bn_recalibration is True
    assert cfg.pixels is False and cfg.nan_normalize is True
    assert cfg.noise_ratio is None and cfg.augmentation == "none"  # "none" is a value here
    assert (cfg.dataset, cfg.setting, cfg.arch) == ("mvtec", "step_k1", "wide_resnet50_2")
    assert args.out == "o"
    cfg, _ = tailedcore.parse_args(["--bn-recalibration", "false", "--fit-seed", "2"])
    assert cfg == dataclasses.replace(TailedCoreConfig(), bn_recalibration=False, fit_seed=2)


def test_config_file_by_path_and_bad_flags(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from experiments.tailedcore.config import TailedCoreConfig\n"
                    "def get_config():\n    return TailedCoreConfig(ratio=0.25)\n")
    cfg, _ = tailedcore.parse_args(["--config", str(path), "--seed", "4"])
    assert (cfg.ratio, cfg.seed) == (0.25, 4)
    for bad in (["--config", "nope"], ["--methods", "patchcore,bad"], ["--lof-k", "x"],
                ["--pixels", "maybe"], ["--dataset", "imagenet"]):
        with pytest.raises(SystemExit):
            tailedcore.parse_args(bad)


def test_main_job_tiny(tmp_path):
    out = tmp_path / "run"
    argv = ["--image-size", "32", "--resize", "37", "--augmentation", "rotflip",
            "--batch-size", "64", "--out", str(out)]
    results = tailedcore.main(argv)
    for name in ("results.json", "results.csv", "results.md", "class_sizes.png",
                 "anomaly_maps_tailedcore.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"patchcore", "softpatch", "tailedcore"}
    for m in saved["methods"].values():
        assert 0.0 <= m["summary"]["all"]["image_auroc"] <= 100.0
        assert np.isfinite(m["summary"]["all"]["pixel_auroc"])
    assert results["config"]["arch"] == "resnet18" and results["config"]["bn_recalibration"]
    # A regression: the all-class image AUROC / pixel AUROC / AUPRO recorded for this run
    # (CPU, XLA's deterministic float32; any change of the pipeline's numbers shows here).
    recorded = {"patchcore": (53.8889, 68.3060, 33.1787), "softpatch": (51.7778, 66.6495, 30.7551),
                "tailedcore": (65.3333, 69.6538, 38.6350)}
    for m, want in recorded.items():
        got = saved["methods"][m]["summary"]["all"]
        np.testing.assert_allclose([got["image_auroc"], got["pixel_auroc"], got["aupro"]], want,
                                   atol=2e-3, err_msg=m)
    # a second run resumes features and memory banks from the cache and reproduces the numbers
    again = tailedcore.main(argv)
    for m in saved["methods"]:
        assert again["methods"][m]["summary"] == results["methods"][m]["summary"]


def _mvtec_folder_with_manifest(tmp_path):
    """A pristine MVTec-layout folder (3 synthetic classes) and an official-format manifest."""
    from tailedcore_jax.data import longtail, mvtec, synthetic

    classes = synthetic.SYNTHETIC_CLASSES[:3]
    data = synthetic.make_synthetic(0, class_sizes={c: 24 for c in classes}, noise_ratio=0.0,
                                    classes=classes, n_test_good=3, n_test_per_defect=1)
    root = synthetic.write_synthetic(tmp_path / "mvtec", data)
    train, test = mvtec.mvtec_records(root, "train"), mvtec.mvtec_records(root, "test")
    split = longtail.build_longtail_split(train, test, {classes[2]: 2}, {classes[0]: 2}, seed=3)
    kept = {r.key for r in split.train if not r.is_noise}
    mdir = longtail.manifest_dir(tmp_path / "manifests", "mvtecad-nlt", "pareto", 1)
    mdir.mkdir(parents=True)
    (mdir / "prune_good.txt").write_text("".join(r.key + "\n" for r in train if r.key not in kept))
    (mdir / "inject_defects.txt").write_text(
        "".join(r.key + "\n" for r in split.train if r.is_noise))
    return root, tmp_path / "manifests", split


def test_real_data_layout_with_manifest_and_stale_cache(tmp_path):
    """dataset=mvtec through an official manifest (random backbone); a changed data file makes
    the cached features recompute, and the log says which file."""
    from experiments.tailedcore import pipeline

    root, manifests, split = _mvtec_folder_with_manifest(tmp_path)
    argv = ["--dataset", "mvtec", "--data-root", str(root), "--manifest-dir", str(manifests),
            "--seed", "1", "--image-size", "32", "--resize", "37", "--augmentation", "none",
            "--methods", "patchcore", "--batch-size", "64", "--out", str(tmp_path / "run")]
    first = tailedcore.main(argv)
    assert first["split"].files and len(first["split"].train_class) == len(split.train)
    assert set(first["classes"]) == {r.class_name for r in split.train}
    from PIL import Image

    target = next(p for p in first["split"].files if "/train/" in p)
    img = np.asarray(Image.open(target)).copy()
    img[0, 0] ^= 1  # a changed training image
    Image.fromarray(img).save(target)
    logs = []
    cfg, _ = tailedcore.parse_args(argv)
    pipeline.run(cfg, tmp_path / "run", log=logs.append)
    assert any("recomputing train_features" in m and target in m for m in logs), logs
    logs.clear()
    pipeline.run(cfg, tmp_path / "run", log=logs.append)  # unchanged now: resumed
    assert not any("recomputing" in m for m in logs) and any("resumed" in m for m in logs)
