"""Tests for tailedcore_jax.data.ood: TFDS loaders (mocked), resizing, generated OOD sets.

TFDS is exercised with ``tfds.testing.mock_data(policy=MockPolicy.USE_CODE)``: with
tensorflow-datasets 4.9.10 this mocks ``tfds.data_source`` without TensorFlow (records are
generated from the builder's feature spec; no metadata files, no download). ``AUTO`` also
falls back to ``USE_CODE`` when no metadata exists, but ``USE_CODE`` says so explicitly.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tailedcore_jax.data import ood as D
from tests.reference import data_ood as ref


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "dtd", "textures", "places365", "lsun",
                                  "lsun/bedroom"])
def test_tfds_sets_load_through_data_source(mock_tfds, tmp_path, name):
    images, labels = D.load_tfds_images(name, data_dir=tmp_path, image_size=24)
    assert images.shape == (5, 24, 24, 3) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int32
    if name.startswith("lsun"):
        assert (labels == -1).all()  # LSUN has no label feature
    else:
        assert (labels >= 0).all()
    assert images.std() > 0  # real (random) pixels, not a blank fill


def test_subset_is_deterministic(mock_tfds, tmp_path):
    a, _ = D.load_tfds_images("cifar10", data_dir=tmp_path, max_examples=3, seed=1)
    b, _ = D.load_tfds_images("cifar10", data_dir=tmp_path, max_examples=3, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 3


def test_id_dataset_from_tfds(mock_tfds, tmp_path):
    data = D.load_id_dataset("cifar10", data_dir=tmp_path)
    assert data.train_images.shape == (5, 32, 32, 3) and data.num_classes == 10
    sets = D.load_ood_sets(["svhn", "gaussian_noise"], data_dir=tmp_path, num=4)
    assert sets["svhn"].shape == (4, 32, 32, 3) and sets["gaussian_noise"].shape == (4, 32, 32, 3)


def test_unprepared_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(D.DatasetNotPreparedError) as err:
        D.load_tfds_images("svhn", data_dir=tmp_path / "empty")
    msg = str(err.value)
    assert "'svhn'" in msg and "svhn_cropped" in msg and str(tmp_path / "empty") in msg
    assert "tfds build svhn_cropped" in msg and "array_record" in msg
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("call", [
    lambda: D.tfds_data_source("imagenet_o"),
    lambda: D.load_ood_sets(["no_such_set"]),
    lambda: D.load_id_dataset("mnist"),
])
def test_unknown_names_list_the_known_ones(call):
    with pytest.raises(ValueError, match="unknown") as err:
        call()
    assert "cifar10" in str(err.value)


def test_bad_requests():
    with pytest.raises(ValueError, match="no OOD sets"):
        D.load_ood_sets([])
    with pytest.raises(ValueError, match="duplicate"):
        D.load_ood_sets(["blobs", "blobs"])
    with pytest.raises(ValueError, match="num must be"):
        D.procedural_ood("blobs", 0)
    with pytest.raises(ValueError, match="unknown procedural"):
        D.procedural_ood("fractals", 2)
    with pytest.raises(ValueError, match="classes must be"):
        D.synthetic_classification(classes=("gear", "gear"))


@pytest.mark.parametrize("shape", [(40, 60, 3), (61, 33, 3), (32, 32, 3), (17, 47, 3), (20, 20), (50, 40, 4)])
def test_resize_center_crop_matches_reference(rng, shape):
    img = rng.integers(0, 256, shape).astype(np.uint8)
    got = D.resize_center_crop(img, 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    src = img if img.ndim == 3 and img.shape[2] == 3 else (
        np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3])
    np.testing.assert_array_equal(got, ref.resize_center_crop(src, 32))


def test_resize_center_crop_matches_torchvision(rng):
    try:
        import torchvision.transforms.functional as tvf
    except Exception as err:  # absent, or a torch/torchvision build mismatch
        pytest.skip(f"torchvision unavailable: {err}")
    from PIL import Image

    img = rng.integers(0, 256, (45, 70, 3)).astype(np.uint8)
    want = tvf.center_crop(tvf.resize(Image.fromarray(img), 32), 32)
    np.testing.assert_array_equal(D.resize_center_crop(img, 32), np.asarray(want))
    with pytest.raises(TypeError):
        D.resize_center_crop(img.astype(np.float32), 32)


@pytest.mark.parametrize("kind", D.PROCEDURAL_OOD_SETS)
def test_procedural_sets_are_deterministic(kind):
    a = D.procedural_ood(kind, 5, seed=3, image_size=16)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, D.procedural_ood(kind, 5, seed=3, image_size=16))
    np.testing.assert_array_equal(a[:2], D.procedural_ood(kind, 2, seed=3, image_size=16))  # prefix-stable
    assert not np.array_equal(a, D.procedural_ood(kind, 5, seed=4, image_size=16))
    assert not np.array_equal(a[0], a[1])


def test_noise_statistics():
    g = D.procedural_ood("gaussian_noise", 20, image_size=16).astype(np.float64)
    u = D.procedural_ood("uniform_noise", 20, image_size=16).astype(np.float64)
    assert abs(g.mean() - 128) < 4 and 55 < g.std() < 64  # N(128, 64^2) clipped to [0, 255]
    assert abs(u.mean() - 127.5) < 4 and abs(u.std() - 73.9) < 3


def test_synthetic_classification_and_heldout():
    data = D.synthetic_classification(0, n_train_per_class=3, n_test_per_class=2, image_size=16)
    k = len(D.SYNTHETIC_ID_CLASSES)
    assert data.train_images.shape == (3 * k, 16, 16, 3) and data.test_images.shape == (2 * k, 16, 16, 3)
    np.testing.assert_array_equal(np.bincount(data.train_labels), [3] * k)
    assert data.class_names == D.SYNTHETIC_ID_CLASSES
    again = D.synthetic_classification(0, n_train_per_class=3, n_test_per_class=2, image_size=16)
    np.testing.assert_array_equal(data.train_images, again.train_images)
    assert not any(np.array_equal(a, b) for a in data.train_images for b in data.test_images)
    assert not set(D.SYNTHETIC_HELDOUT_CLASSES) & set(D.SYNTHETIC_ID_CLASSES)
    held = D.synthetic_heldout(6, image_size=16)
    assert held.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(held[:3], D.synthetic_heldout(3, image_size=16))


def test_recolour_option_is_deterministic_and_changes_colours():
    a = D.synthetic_classification(0, n_train_per_class=2, n_test_per_class=1, image_size=16, recolour=True)
    b = D.synthetic_classification(0, n_train_per_class=2, n_test_per_class=1, image_size=16, recolour=True)
    plain = D.synthetic_classification(0, n_train_per_class=2, n_test_per_class=1, image_size=16)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, plain.train_images)
    np.testing.assert_array_equal(a.train_labels, plain.train_labels)
