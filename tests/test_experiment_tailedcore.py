"""The main job end to end at a tiny size: it runs offline and writes every artefact."""

import json

import numpy as np

from experiments import tailedcore


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
    # a second run resumes features and memory banks from the cache and reproduces the numbers
    again = tailedcore.main(argv)
    for m in saved["methods"]:
        assert again["methods"][m]["summary"] == results["methods"][m]["summary"]
