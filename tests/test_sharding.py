"""kNN / greedy coreset / patch-wise LOF / memory fits with ``mesh=``, against one device.

The main pytest process has already initialised JAX with one CPU device, so the tests that
need a mesh are skipped there, and ``test_spawn_8_host_devices`` reruns this file in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. (Run the file
directly under that flag and the tests run in-process; the spawner then skips itself.)

Every sharded result is compared with the single-device function **exactly**
(``assert_array_equal``), and with a plain-numpy oracle from ``tests/reference``. The one
documented exception: kNN distances when each side computes its own bank norms (1-ulp
differences allowed there; with shared ``bank_sq_norms`` they are compared exactly).
"""

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from tailedcore_jax import coreset, knn, lof, memory
from tests.reference import coreset as ref_coreset
from tests.reference import knn as ref_knn
from tests.reference import lof as ref_lof

NUM_DEVICES = 8
needs_mesh = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason="needs 8 devices; run by test_spawn_8_host_devices in a subprocess",
)


def test_spawn_8_host_devices():
    """Runs the mesh tests of this file in a subprocess with 8 forced host devices."""
    if jax.device_count() >= NUM_DEVICES:
        pytest.skip("already running with >= 8 devices")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "not test_spawn_8_host_devices"],
        check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("x",))


@pytest.fixture(scope="module")
def mesh2d():
    return Mesh(np.array(jax.devices()[:NUM_DEVICES]).reshape(2, 4), ("a", "b"))


def test_bad_mesh_arguments():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(TypeError, match="Mesh"):
        knn.nearest_neighbors(x, x, mesh="cpu")
    mesh1 = Mesh(np.array(jax.devices()[:1]), ("x",))
    with pytest.raises(ValueError, match="not an axis"):
        knn.nearest_neighbors(x, x, mesh=mesh1, axis_name="y")
    with pytest.raises(ValueError, match="k=5"):
        knn.nearest_neighbors(x, x, k=5, mesh=mesh1)
    with pytest.raises(ValueError, match="non-finite"):
        coreset.greedy_coreset(jax.random.key(0), np.full((4, 2), np.nan, np.float32), 2,
                                 mesh=mesh1)
    with pytest.raises(ValueError, match="no rows"):
        coreset.greedy_coreset_masked(jax.random.key(0), x, 2, mesh=mesh1, mask=np.zeros(4, bool))
    with pytest.raises(ValueError, match="k \\+ 1"):
        lof.patchwise_lof(np.zeros((3, 2, 2), np.float32), mesh=mesh1)


# ----------------------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------------------


@needs_mesh
@pytest.mark.parametrize("k", [1, 4])
def test_knn_equals_single_device_uneven_masked(mesh, rng, k):
    q = rng.normal(size=(37, 16)).astype(np.float32)
    b = rng.normal(size=(203, 16)).astype(np.float32)  # 203 = 8 * 26 - 5: uneven shards
    m = rng.random(203) > 0.3
    single = knn.nearest_neighbors(q, b, k=k, bank_mask=m, bank_chunk=16, query_chunk=16)
    sharded = knn.nearest_neighbors(q, b, k=k, mesh=mesh, bank_mask=m, bank_chunk=16,
                                          query_chunk=16)
    np.testing.assert_array_equal(sharded.indices, single.indices)
    np.testing.assert_array_equal(sharded.sq_distances, single.sq_distances)
    want_d, want_i, _ = ref_knn.knn(q, b, k, bank_mask=m)
    np.testing.assert_array_equal(sharded.indices, want_i)
    np.testing.assert_allclose(sharded.sq_distances, want_d, rtol=1e-4, atol=1e-4)


@needs_mesh
def test_knn_ties_across_shards_and_k_larger_than_shard(mesh2d, rng):
    # Integer data: exact distances, many exact ties spread over shards.
    b = rng.integers(0, 3, size=(21, 3)).astype(np.float32)  # 3 rows per shard, k = 5 > 3
    q = rng.integers(0, 3, size=(9, 3)).astype(np.float32)
    single = knn.nearest_neighbors(q, b, k=5)
    for axis_name in (None, "b"):
        sharded = knn.nearest_neighbors(q, b, k=5, mesh=mesh2d, axis_name=axis_name)
        np.testing.assert_array_equal(sharded.indices, single.indices)
        np.testing.assert_array_equal(sharded.sq_distances, single.sq_distances)
    _, want_i, _ = ref_knn.knn(q, b, 5)
    np.testing.assert_array_equal(single.indices, want_i)


@needs_mesh
def test_knn_under_jit_no_retrace_and_missing_slots(mesh, rng):
    q = rng.normal(size=(10, 8)).astype(np.float32)
    b = rng.normal(size=(50, 8)).astype(np.float32)

    norms = knn.sq_norms(b)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(queries, bank, mask, bank_sq_norms):
        return knn.nearest_neighbors(queries, bank, k=3, mesh=mesh, bank_mask=mask,
                                           bank_chunk=8, bank_sq_norms=bank_sq_norms)

    single = jax.jit(lambda qq, bb, mm: knn.nearest_neighbors(qq, bb, k=3, bank_mask=mm,
                                                              bank_chunk=8))
    for mask in (np.arange(50) % 3 == 0, np.arange(50) < 2):  # second: fewer than k valid
        got = run(q, b, mask, norms)
        want = single(q, b, mask)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.sq_distances, want.sq_distances)
        # Norms computed inside the outer jit: XLA may partition that reduction over the
        # devices (last-bit differences, documented); indices still agree here.
        got = jax.jit(lambda qq, bb, mm: knn.nearest_neighbors(
            qq, bb, k=3, mesh=mesh, bank_mask=mm, bank_chunk=8))(q, b, mask)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.sq_distances, want.sq_distances, rtol=1e-6)
    assert np.all(np.asarray(got.indices)[:, 2] == -1)


# ----------------------------------------------------------------------------------------
# greedy coreset
# ----------------------------------------------------------------------------------------


@needs_mesh
@pytest.mark.parametrize("variant", ["default", "difference", "bfloat16"])
def test_coreset_equals_single_device(mesh, rng, key, variant):
    f = rng.normal(size=(1003, 40)).astype(np.float32)  # uneven: 1003 over 8 shards
    m = rng.random(1003) > 0.2
    kw = {"distance": "difference"} if variant == "difference" else (
        {"storage_dtype": jnp.bfloat16} if variant == "bfloat16" else {})
    single = coreset.greedy_coreset(key, f, 60, mask=m, projection_dim=8, **kw)
    sharded = coreset.greedy_coreset(key, f, 60, mask=m, projection_dim=8, mesh=mesh, **kw)
    np.testing.assert_array_equal(sharded, single)
    if variant == "default":
        w = coreset.random_projection(jax.random.split(key)[0], 40, 8)
        want = ref_coreset.greedy_coreset(ref_coreset.project(f, w), 60, int(sharded[0]), mask=m)
        # float64 oracle: agreement on all but possible float32 near-ties at the very end
        assert np.mean(np.asarray(sharded) == want) > 0.9
        assert np.asarray(m)[np.asarray(sharded)].all()


@needs_mesh
def test_coreset_first_index_ties_across_shards(mesh):
    # Integer points on a line, duplicated in several shards: every farthest point is tied
    # with copies in later shards, and the lowest global index must win.
    base = np.array([0.0, 10.0, 4.0, 7.0, 2.0], np.float32)
    f = np.tile(base, 9)[:43, None]  # 43 rows: copies of each value in 8-9 shards
    for start in (0, 17, 42):
        single = coreset.greedy_coreset(jax.random.key(0), f, 5, projection_dim=None,
                                        start_index=start)
        sharded = coreset.greedy_coreset(jax.random.key(0), f, 5, projection_dim=None,
                                           start_index=start, mesh=mesh)
        want = ref_coreset.greedy_coreset(f, 5, start)
        np.testing.assert_array_equal(sharded, want)
        np.testing.assert_array_equal(single, want)


@needs_mesh
def test_coreset_masked_ratio_num_valid_and_jit(mesh2d, rng, key):
    f = rng.normal(size=(301, 12)).astype(np.float32)
    m = rng.random(301) > 0.4
    cap = 40
    single = coreset.greedy_coreset_masked(key, f, cap, mask=m, ratio=0.1, projection_dim=4)
    sharded = coreset.greedy_coreset_masked(key, f, cap, mask=m, ratio=0.1, projection_dim=4,
                                              mesh=mesh2d)
    np.testing.assert_array_equal(sharded.indices, single.indices)
    np.testing.assert_array_equal(sharded.valid, single.valid)
    assert int(sharded.valid.sum()) == ref_coreset.ratio_count(int(m.sum()), 0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(feats, mask, nv):
        return coreset.greedy_coreset_masked(key, feats, cap, mask=mask, num_valid=nv,
                                               projection_dim=4, mesh=mesh2d, axis_name="b")

    for nv, mask in ((7, m), (25, ~m)):
        got = run(f, mask, jnp.int32(nv))
        want = coreset.greedy_coreset_masked(key, f, cap, mask=mask, num_valid=nv,
                                             projection_dim=4)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.valid, want.valid)
        assert int(got.valid.sum()) == nv


@needs_mesh
def test_coreset_two_level_argmax_shards(mesh, rng, key):
    # > 4 * 1024 rows per shard: the local argmax takes its two-level path.
    f = rng.normal(size=(8 * 4096 + 77, 4)).astype(np.float32)
    single = coreset.greedy_coreset(key, f, 25, projection_dim=None)
    sharded = coreset.greedy_coreset(key, f, 25, projection_dim=None, mesh=mesh)
    np.testing.assert_array_equal(sharded, single)


# ----------------------------------------------------------------------------------------
# patch-wise LOF
# ----------------------------------------------------------------------------------------


@needs_mesh
def test_patchwise_lof_equals_single_device(mesh, rng):
    x = rng.normal(size=(20, 13, 8)).astype(np.float32)  # 13 positions over 8 devices
    im = np.arange(20) != 3
    single = lof.patchwise_lof(x, mask=im, position_chunk=2)
    sharded = lof.patchwise_lof(x, mask=im, mesh=mesh, position_chunk=2)
    np.testing.assert_array_equal(sharded, single)
    np.testing.assert_array_equal(lof.patchwise_lof(x, mask=im, mesh=mesh),
                                  lof.patchwise_lof(x, mask=im))
    want = ref_lof.patchwise_lof_numpy(x[im], 6)
    np.testing.assert_allclose(np.asarray(sharded)[im], want, rtol=1e-4)
    assert np.all(np.asarray(sharded)[3] == 0)
    jitted = jax.jit(lambda a, b: lof.patchwise_lof(a, mask=b, mesh=mesh))(x, im)
    np.testing.assert_array_equal(jitted, lof.patchwise_lof(x, mask=im))


# ----------------------------------------------------------------------------------------
# memory.fit_* / score with mesh=
# ----------------------------------------------------------------------------------------


def _assert_banks_equal(a, b):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            np.testing.assert_array_equal(x, y)


@needs_mesh
def test_memory_fit_and_score_with_mesh_equal_without(mesh, rng, key):
    f = rng.normal(size=(10, 3, 3, 8)).astype(np.float32)  # 4-D input, 9 positions, 90 rows
    img_mask = np.arange(10) != 9
    emb = rng.normal(size=(10, 5)).astype(np.float32)
    tail = np.arange(10) < 2
    aug = rng.normal(size=(3, 9, 8)).astype(np.float32)
    q = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
    kw = {"ratio": 0.2, "projection_dim": 4, "lof_projection_dim": 4}
    cases = [
        (memory.fit_patchcore, (key, f), {"ratio": 0.2, "projection_dim": 4, "mask": img_mask}),
        (memory.fit_softpatch, (key, f), dict(kw, mask=img_mask)),
        (memory.fit_tailedcore, (key, f, emb),
         dict(kw, mask=img_mask, tail_mask=tail, augmented_tail_features=aug)),
    ]
    for fit, args, kwargs in cases:
        plain = fit(*args, **kwargs)
        sharded = fit(*args, mesh=mesh, **kwargs)
        _assert_banks_equal(sharded, plain)
        s_img, s_patch = memory.score(sharded, q, mesh=mesh)
        p_img, p_patch = memory.score(plain, q)
        # The kNN keys are bit-identical by construction, but the bank norms are computed in
        # a different XLA program than on one device, which can move a distance by an ulp.
        np.testing.assert_array_max_ulp(s_img, p_img, maxulp=2)
        np.testing.assert_array_max_ulp(s_patch, p_patch, maxulp=2)
        norms = jnp.sum(sharded.features * sharded.features, axis=1)
        s_nn = knn.nearest_neighbors(q.reshape(-1, 8), sharded.features, mesh=mesh,
                                           bank_mask=sharded.mask, bank_sq_norms=norms)
        p_nn = knn.nearest_neighbors(q.reshape(-1, 8), plain.features, bank_mask=plain.mask,
                                     bank_sq_norms=norms)
        np.testing.assert_array_equal(s_nn.indices, p_nn.indices)
        np.testing.assert_array_equal(s_nn.sq_distances, p_nn.sq_distances)
        assert s_patch.shape == (2, 3, 3)
