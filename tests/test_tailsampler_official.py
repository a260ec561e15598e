"""TailSampler against the official code's own outputs (committed fixture; live if available).

``tests/fixtures/tailsampler_official.npz`` holds the official ``AdaptiveTailSampler('trim_min',
'mode')`` outputs on six generated mixtures (step K=4, step K=1, Pareto, balanced, tight
clusters, singletons), recorded on a CPU by ``tests/fixtures/make_tailsampler_fixture.py``.
With ``similarity_rounding="torch_cpu"`` every threshold, class size, K* and tail image must be
bit-equal. The live test reruns the official code when ``TAILEDCORE_OFFICIAL_SRC`` points at a
checkout and torch is installed.
"""

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax import tailsampler as T
from tests.reference import tailsampler as R

FIXTURE = Path(__file__).parent / "fixtures" / "tailsampler_official.npz"


def _load():
    d = np.load(FIXTURE)
    names = json.loads(str(d["meta"]))["mixtures"]
    return {n: {k.split("/", 1)[1]: d[k] for k in d.files if k.startswith(n + "/")}
            for n in names}


MIXTURES = _load()


def _assert_official(stats, ref):
    n = ref["E"].shape[0]
    np.testing.assert_array_equal(np.asarray(stats.thresholds), ref["thresholds"])
    np.testing.assert_array_equal(np.asarray(stats.class_sizes), ref["class_sizes"])
    assert int(stats.k_star) == int(ref["k_star"])
    groups = np.asarray(stats.groups)[np.asarray(stats.group_mask)]
    np.testing.assert_array_equal(groups, ref["groups"])
    tail = np.zeros(n, bool)
    tail[ref["tail_indices"]] = True
    np.testing.assert_array_equal(np.asarray(stats.tail_mask), tail)


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_bit_equal_to_recorded_official_outputs(name):
    ref = MIXTURES[name]
    e = jnp.asarray(ref["E"].astype(np.float32))
    _assert_official(T.tail_sampler_statistics(e, similarity_rounding="torch_cpu"), ref)


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_numpy_port_is_official_too(name):
    """The plain-NumPy port (tests/reference) with torch-CPU similarity rounding."""
    ref = MIXTURES[name]
    got = R.tail_sampler(similarity=R.torch_cpu_similarity(ref["E"].astype(np.float32)))
    np.testing.assert_array_equal(got["thresholds"], ref["thresholds"])
    np.testing.assert_array_equal(got["class_sizes"], ref["class_sizes"])
    np.testing.assert_array_equal(np.flatnonzero(got["tail_mask"]), ref["tail_indices"])


def test_fixture_mixtures_cover_the_shapes():
    assert set(MIXTURES) == {"step_k4", "step_k1", "pareto", "balanced", "tight", "singletons"}
    assert min(m["E"].shape[0] for m in MIXTURES.values()) >= 12  # the emulated MKL kernels
    sizes = np.concatenate([m["class_sizes"] for m in MIXTURES.values()])
    assert np.nanmin(sizes) == 1 and np.nanmax(sizes) >= 100


def test_torch_cpu_rounding_under_jit_and_mask():
    ref = MIXTURES["step_k4"]
    e = ref["E"].astype(np.float32)
    n = e.shape[0]
    padded = np.concatenate([e, np.ones((5, e.shape[1]), np.float32)])
    mask = np.arange(n + 5) < n
    import jax

    stats = jax.jit(lambda x, m: T.tail_sampler_statistics(
        x, mask=m, similarity_rounding="torch_cpu"))(padded, mask)
    np.testing.assert_array_equal(np.asarray(stats.class_sizes)[:n], ref["class_sizes"])
    np.testing.assert_array_equal(np.asarray(stats.tail_mask)[:n],
                                  np.isin(np.arange(n), ref["tail_indices"]))


def test_unknown_rounding_is_an_error():
    with pytest.raises(ValueError, match="rounding"):
        T.cosine_similarity_matrix(np.ones((3, 2), np.float32), rounding="gpu")
    with pytest.raises(ValueError, match="similarity_rounding"):
        T.tail_sample_mask(np.eye(3, dtype=np.float32), similarity_rounding="torch")


def test_live_against_official_code():
    src = os.environ.get("TAILEDCORE_OFFICIAL_SRC")
    if not src:
        pytest.skip("set TAILEDCORE_OFFICIAL_SRC to a jungyg/TailedCore checkout")
    torch = pytest.importorskip("torch")
    import sys

    sys.path.insert(0, src)
    try:
        from src import sampler
    except ImportError as exc:  # the official code's own requirements are not installed
        pytest.skip(f"cannot import the official sampler: {exc}")

    rng = np.random.default_rng(7)
    for sizes, dim in (([50] * 5 + [3] * 8, 96), ([80, 40, 20, 10, 5, 2, 1, 1], 200)):
        c = rng.standard_normal((len(sizes), dim))
        lab = np.repeat(np.arange(len(sizes)), sizes)
        e = np.abs(c[lab] + 0.3 * rng.standard_normal((len(lab), dim))).astype(np.float32)
        _, idx, sizes_t = sampler.AdaptiveTailSampler("trim_min", "mode").run(
            torch.from_numpy(e), return_class_sizes=True)
        tail, got = T.tail_sample_mask(jnp.asarray(e), similarity_rounding="torch_cpu")
        np.testing.assert_array_equal(np.asarray(got), sizes_t.numpy().astype(np.float32))
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(tail)), idx.numpy())
