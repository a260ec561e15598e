"""Round trip, atomicity and mismatch errors of tailedcore_jax.checkpoint."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax import checkpoint


class Bank(NamedTuple):
    features: jax.Array
    mask: jax.Array
    weights: jax.Array | None = None


def _bank(n=7, d=5, weights=True):
    f = jnp.arange(n * d, dtype=jnp.float32).reshape(n, d) / 3.0
    m = jnp.arange(n) < n - 2
    w = jnp.linspace(0.5, 2.0, n, dtype=jnp.float32) if weights else None
    return Bank(f, m, w)


@pytest.mark.parametrize("weights", [True, False])
def test_round_trip_exact(tmp_path, weights):
    bank = _bank(weights=weights)
    checkpoint.save(tmp_path / "bank", bank)
    assert checkpoint.exists(tmp_path / "bank")
    out = checkpoint.restore(tmp_path / "bank", like=bank)
    assert isinstance(out, Bank)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(bank)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    if not weights:
        assert out.weights is None


def test_round_trip_nested_variables_and_abstract_like(tmp_path):
    tree = {"params": {"conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)}},
            "batch_stats": {"bn": {"mean": np.zeros(4, np.float32)}}, "step": np.int32(12)}
    checkpoint.save(tmp_path / "v", tree)
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    out = checkpoint.restore(tmp_path / "v", like=like)
    np.testing.assert_array_equal(out["params"]["conv"]["kernel"], tree["params"]["conv"]["kernel"])
    assert int(out["step"]) == 12
    raw = checkpoint.restore(tmp_path / "v")  # no `like`: plain nested dicts
    np.testing.assert_array_equal(raw["batch_stats"]["bn"]["mean"], np.zeros(4))


def test_refuses_to_overwrite_then_overwrites(tmp_path):
    checkpoint.save(tmp_path / "c", _bank())
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(tmp_path / "c", _bank(n=9))
    checkpoint.save(tmp_path / "c", _bank(n=9), overwrite=True)
    out = checkpoint.restore(tmp_path / "c", like=_bank(n=9))
    assert out.features.shape == (9, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary or backup left over


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    old = _bank()
    checkpoint.save(tmp_path / "c", old)

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash while writing the manifest")

    monkeypatch.setattr(checkpoint, "tree_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "c", _bank(n=9), overwrite=True)
    monkeypatch.undo()
    out = checkpoint.restore(tmp_path / "c", like=old)
    np.testing.assert_array_equal(np.asarray(out.features), np.asarray(old.features))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "tree_manifest", lambda t: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "c", _bank())
    assert not (tmp_path / "c").exists()
    assert not checkpoint.exists(tmp_path / "c")


def test_incomplete_directory_is_rejected(tmp_path):
    (tmp_path / "c" / "state").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a complete"):
        checkpoint.restore(tmp_path / "c")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "nothing")


def test_mismatched_structure_is_named(tmp_path):
    checkpoint.save(tmp_path / "c", _bank())
    with pytest.raises(ValueError, match=r"\.features: saved shape \(7, 5\) != expected \(8, 5\)"):
        checkpoint.restore(tmp_path / "c", like=_bank(n=8))
    with pytest.raises(ValueError, match="missing from the checkpoint|no counterpart"):
        checkpoint.restore(tmp_path / "c", like={"features": np.zeros((7, 5), np.float32)})
    bad_dtype = _bank()._replace(features=np.zeros((7, 5), np.float16))
    with pytest.raises(ValueError, match="dtype float32 != expected float16"):
        checkpoint.restore(tmp_path / "c", like=bad_dtype)


def test_empty_tree_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty pytree"):
        checkpoint.save(tmp_path / "c", {})
