"""Benchmark: patch-position-wise LOF (SoftPatch/TailedCore filter) vs the official sklearn loop.

The official `LOFSampler._compute_patchwise_lof` fits
`sklearn.neighbors.LocalOutlierFactor(n_neighbors=6, metric="l2")` once per patch position
(784 positions) on the N image vectors of that position. Here both run in the same process on
the same float32 data. The sklearn loop is timed on a subset of positions and extrapolated
linearly to all positions (every position is an independent fit of the same size), which the
JSON states. JAX compile time and steady-state time are reported separately.

Usage:
    python benchmarks/bench_lof.py            # N=800 images, P=784 positions, d=128
    python benchmarks/bench_lof.py --smoke    # seconds on CPU
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

from tailedcore_jax.lof import _auto_position_chunk, patchwise_lof


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--positions", type=int, default=784)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--sklearn-positions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--position-chunk", type=int, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.positions, args.dim = 60, 12, 16
        args.sklearn_positions, args.repeats = 12, 2

    from sklearn.neighbors import LocalOutlierFactor

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.images, args.positions, args.dim)).astype(np.float32)
    chunk = args.position_chunk or _auto_position_chunk(
        args.images, args.positions, args.dim, args.k
    )

    fn = jax.jit(lambda x: patchwise_lof(x, k=args.k, position_chunk=chunk))
    x_dev = jax.device_put(feats)
    t0 = time.perf_counter()
    compiled = fn.lower(x_dev).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(x_dev)
    out.block_until_ready()  # warm-up
    times = []
    with jax.transfer_guard("disallow"):
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = compiled(x_dev)
            out.block_until_ready()
            times.append(time.perf_counter() - t0)
    jax_s = float(np.median(times))

    n_sk = min(args.sklearn_positions, args.positions)
    sk_scores = []
    t0 = time.perf_counter()
    for p in range(n_sk):
        est = LocalOutlierFactor(n_neighbors=args.k, metric="l2").fit(feats[:, p])
        sk_scores.append(-est.negative_outlier_factor_)
    sk_subset_s = time.perf_counter() - t0
    sk_total_s = sk_subset_s * args.positions / n_sk

    got = np.asarray(out)[:, :n_sk]
    want = np.stack(sk_scores, axis=1)
    max_rel_err = float(np.max(np.abs(got - want) / np.abs(want)))

    result = {
        "benchmark": "patchwise_lof",
        "images": args.images,
        "positions": args.positions,
        "dim": args.dim,
        "k": args.k,
        "position_chunk": chunk,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "jax_compile_s": round(compile_s, 4),
        "jax_steady_s": round(jax_s, 5),
        "jax_steady_all_s": [round(t, 5) for t in times],
        "sklearn_positions_timed": n_sk,
        "sklearn_subset_s": round(sk_subset_s, 4),
        "sklearn_extrapolated_s": round(sk_total_s, 4),
        "sklearn_note": (
            f"sklearn LocalOutlierFactor(n_neighbors={args.k}, metric='l2') looped over "
            f"{n_sk} of {args.positions} positions, time scaled by {args.positions}/{n_sk}"
        ),
        "speedup_vs_sklearn": round(sk_total_s / jax_s, 2),
        "max_rel_err_vs_sklearn": max_rel_err,
        "smoke": bool(args.smoke),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    jnp.zeros(()).block_until_ready()
    main()
