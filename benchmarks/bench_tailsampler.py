"""Benchmark: ``tail_sample_mask`` (JAX) vs the straightforward NumPy TailSampler.

Generated long-tail mixtures of 2048-d embeddings (class centres on the sphere plus noise,
class sizes following 200, 100, 60, 30, 10, 5, 4, 2, 1, 1 scaled to N). For each N the
script reports the JAX compile time (first call minus a steady call), the steady-state
time (median of ``--repeats`` calls with ``block_until_ready``), the time of the NumPy
reference port (``tests/reference/tailsampler.py``: per-row NumPy thresholds, scipy mode
vote, Python grouping loop) in the same process, their ratio, and whether both selected
the same tail images from the same similarity matrix.

Usage::

    python benchmarks/bench_tailsampler.py            # N = 500, 1000, 2000, 5000
    python benchmarks/bench_tailsampler.py --smoke    # N = 200, seconds

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np

from tailedcore_jax import tailsampler
from tests.reference import tailsampler as ref

BASE_SIZES = (200, 100, 60, 30, 10, 5, 4, 2, 1, 1)


def mixture_sizes(n: int) -> list[int]:
    """Scale the base long-tail profile to ``n`` images (small classes kept small)."""
    total = sum(BASE_SIZES)
    if n >= total:
        sizes = list(BASE_SIZES) * (n // total)
    else:  # shrink the head classes, keep the tail classes
        sizes = [max(1, round(s * n / total)) if s >= 10 else s for s in BASE_SIZES]
    sizes[0] += n - sum(sizes)  # absorb the remainder in a head class
    return sizes


def time_call(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(n: int, dim: int, repeats: int, ref_repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    emb, _ = ref.long_tail_mixture(rng, mixture_sizes(n), dim=dim, noise=0.5)
    x = jax.device_put(emb)
    fn = jax.jit(tailsampler.tail_sample_mask)

    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    first = time.perf_counter() - t0
    steady = time_call(lambda: fn(x), repeats)

    # NumPy baseline on the same embeddings (its own float32 matmul).
    ref_t = []
    out = None
    for _ in range(ref_repeats):
        t0 = time.perf_counter()
        out = ref.tail_sampler(emb)
        ref_t.append(time.perf_counter() - t0)
    ref_time = statistics.median(ref_t)

    # Agreement from the same similarity matrix (the matmuls differ by a few ulps).
    stats = jax.jit(tailsampler.tail_sampler_statistics)(x)
    same = ref.tail_sampler(similarity=np.asarray(stats.similarity))
    return {
        "n": n,
        "dim": dim,
        "jax_compile_s": round(max(first - steady, 0.0), 4),
        "jax_first_call_s": round(first, 4),
        "jax_steady_s": round(steady, 4),
        "numpy_ref_s": round(ref_time, 4),
        "speedup_vs_numpy": round(ref_time / steady, 2),
        "tail_count": int(np.asarray(stats.tail_mask).sum()),
        "same_tail_as_ref_from_same_similarity": bool(
            np.array_equal(np.asarray(stats.tail_mask), same["tail_mask"])
        ),
        "same_tail_as_ref_end_to_end": bool(np.array_equal(np.asarray(fn(x)[0]), out["tail_mask"])),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        sizes, dim, repeats, ref_repeats = args.sizes or [200], 256, 2, 1
    else:
        sizes, dim, repeats, ref_repeats = (
            args.sizes or [500, 1000, 2000, 5000],
            args.dim,
            args.repeats,
            1,
        )
    results = [bench(n, dim, repeats, ref_repeats, args.seed) for n in sizes]
    print(
        json.dumps(
            {
                "benchmark": "tail_sample_mask",
                "baseline": "tests/reference/tailsampler.py (NumPy/scipy port of the official code)",
                "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()],
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "smoke": args.smoke,
                "target": "N=5000 steady < 5 s on CPU",
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
