"""Benchmark: greedy k-center coreset on projected features (N x d float32, 10 % selected).

Compares, in one process and on the same data:

* ``jax``: :func:`tailedcore_jax.coreset.greedy_coreset` under ``jax.jit`` (one
  ``lax.fori_loop``; compile time reported separately from the warm run), plus opt-in
  variants (``bfloat16``/``float16`` storage, ``distance="difference"``);
* ``numpy``: the same algorithm as a Python loop (per step: one ``P @ c`` matvec with
  precomputed squared norms, ``np.minimum``, ``np.argmax``);
* ``torch``: a loop written the way the official ``GreedyCoresetSampler`` works (per step
  ``torch.norm(P - P[last], dim=1)``, ``torch.minimum``, ``argmax().item()``), CPU;
  skipped if torch is not importable;
* ``floor``: a memory-bandwidth floor, the best time to stream the ``N x d`` matrix once
  (numpy matvec, XLA matvec, XLA sum; best of several) times the number of steps.

Full runs at N = 200k take ~20k steps; ``--steps S`` times S steps per method and
extrapolates the per-step time to the full ``k - 1`` steps (``"extrapolated": true``). All
timings are wall-clock; on a shared machine they are noisy (the load average before and
after is reported).

Usage::

    python benchmarks/bench_coreset.py --smoke
    python benchmarks/bench_coreset.py --sizes 50000,100000,200000 --steps 300
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from tailedcore_jax.coreset import greedy_coreset


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def stream_floor_s(p_np, p_jax, repeats):
    """Best time to read the (N, d) float32 matrix once, over a few streaming kernels
    (matrix-vector products in both layouts and a plain sum), best of ``repeats``."""
    c = p_np[0].copy()
    hi = jax.lax.Precision.HIGHEST
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=hi))
    dot_t = jax.jit(lambda a_t, b: jnp.dot(b, a_t, precision=hi))
    total = jax.jit(jnp.sum)
    c_j = jnp.asarray(c)
    p_t = jnp.asarray(np.ascontiguousarray(p_np.T))
    dot(p_jax, c_j).block_until_ready()
    dot_t(p_t, c_j).block_until_ready()
    total(p_jax).block_until_ready()
    times = {
        "numpy_matvec": _best(lambda: p_np @ c, repeats),
        "xla_matvec": _best(lambda: dot(p_jax, c_j).block_until_ready(), repeats),
        "xla_matvec_transposed": _best(lambda: dot_t(p_t, c_j).block_until_ready(), repeats),
        "xla_sum": _best(lambda: total(p_jax).block_until_ready(), repeats),
    }
    return min(times.values()), times


def numpy_greedy(p, steps, start):
    """Same algorithm as the library: expansion form, first-index argmax."""
    sq = np.einsum("ij,ij->i", p, p)
    min_d = np.full(p.shape[0], np.inf, np.float32)
    min_d[start] = -np.inf
    idx = [start]
    last = start
    for _ in range(steps - 1):
        dot = p @ p[last]
        dist = sq - 2.0 * dot
        dist += 2.0 * dot[last] - sq[last]
        np.maximum(dist, 0.0, out=dist)
        np.minimum(min_d, dist, out=min_d)
        last = int(np.argmax(min_d))
        min_d[last] = -np.inf
        idx.append(last)
    return np.asarray(idx)


def torch_greedy(p_t, steps, start, torch):
    """The official brute-force loop (GreedyCoresetSampler._brute_compute_greedy_coreset_indices)."""
    min_d = torch.ones(len(p_t)) * float("inf")
    idx = [start]
    for _ in range(steps - 1):
        cur = torch.norm(p_t - p_t[idx[-1]], dim=1)
        min_d = torch.minimum(min_d, cur)
        idx.append(torch.argmax(min_d, dim=0).item())
    return np.asarray(idx)


def time_jax(p_jax, steps, start, repeats, **kw):
    key = jax.random.key(0)
    f = jax.jit(
        lambda k, x: greedy_coreset(k, x, steps, projection_dim=None, start_index=start, **kw)
    )
    t = time.perf_counter()
    compiled = f.lower(key, p_jax).compile()
    compile_s = time.perf_counter() - t
    out = compiled(key, p_jax).block_until_ready()  # warm-up
    run_s = _best(lambda: compiled(key, p_jax).block_until_ready(), repeats)
    return compile_s, run_s, np.asarray(out)


def bench_one(n, d, ratio, steps, repeats, variants, torch):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((n, d), dtype=np.float32)
    p_jax = jnp.asarray(p)
    k = max(1, int(n * ratio))
    steps = k if steps is None else min(steps, k)
    full_steps = k - 1
    start = 0
    floor_s, floor_parts = stream_floor_s(p, p_jax, repeats=max(5, 2 * repeats))
    rec = {
        "n": n,
        "d": d,
        "k": k,
        "steps_timed": steps - 1,
        "extrapolated": steps < k,
        "floor": {
            "stream_once_ms": round(floor_s * 1e3, 3),
            "parts_ms": {key: round(v * 1e3, 3) for key, v in floor_parts.items()},
            "total_s": round(floor_s * full_steps, 3),
        },
    }

    def entry(run_s, extra=None):
        per = run_s / max(steps - 1, 1)
        e = {
            "ms_per_step": round(per * 1e3, 3),
            "total_s": round(per * full_steps, 3),
            "vs_floor": round(per / floor_s, 3),
        }
        e.update(extra or {})
        return e

    t_np = _best(lambda: numpy_greedy(p, steps, start), repeats)
    idx_np = numpy_greedy(p, steps, start)
    rec["numpy"] = entry(t_np)
    baseline = t_np
    try:  # OpenBLAS threads can hurt a per-step matvec on a loaded machine: time 1 thread too
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            t_np1 = _best(lambda: numpy_greedy(p, steps, start), repeats)
        rec["numpy_1thread"] = entry(t_np1)
        baseline = min(baseline, t_np1)
    except ImportError:
        pass
    base_ms = baseline / max(steps - 1, 1) * 1e3

    for name, kw in variants:
        compile_s, run_s, idx = time_jax(p_jax, steps, start, repeats, **kw)
        agree = float(np.mean(idx == idx_np))
        rec[name] = entry(run_s, {"compile_s": round(compile_s, 3),
                                  "index_agreement_with_numpy": round(agree, 4)})
        # Against the faster of the two numpy loops.
        rec[name]["vs_numpy"] = round(rec[name]["ms_per_step"] / base_ms, 3)

    if torch is not None:
        p_t = torch.from_numpy(p)
        t_t = _best(lambda: torch_greedy(p_t, steps, start, torch), repeats)
        idx_t = torch_greedy(p_t, steps, start, torch)
        rec["torch_official_loop"] = entry(t_t, {
            "index_agreement_with_numpy": round(float(np.mean(idx_t == idx_np)), 4),
            "threads": torch.get_num_threads(),
        })
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rec["torch_official_loop_1thread"] = entry(
                _best(lambda: torch_greedy(p_t, steps, start, torch), repeats))
        finally:
            torch.set_num_threads(threads)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    ap.add_argument("--sizes", default="50000,100000,200000")
    ap.add_argument("--dim", type=int, default=128, help="projected dimension d")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=300,
                    help="steps timed per method (0: the full k); extrapolated to k - 1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="float32,bfloat16,float16,difference",
                    help="jax variants: float32 (default path), bfloat16, float16, difference")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    if args.smoke:
        sizes, steps, repeats = [5000], 20, 1
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        steps, repeats = (args.steps or None), args.repeats
    table = {
        "float32": {},
        "bfloat16": {"storage_dtype": jnp.bfloat16},
        "float16": {"storage_dtype": jnp.float16},
        "difference": {"distance": "difference"},
    }
    variants = [("jax_" + v, table[v]) for v in args.variants.split(",") if v]
    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        except Exception:  # noqa: BLE001 - optional baseline
            torch = None

    load_before = os.getloadavg()
    results = [bench_one(n, args.dim, args.ratio, steps, repeats, variants, torch)
               for n in sizes]
    for r in results:
        # Headline ratios (the project targets: jax <= numpy, jax <= 1.5 x floor).
        if "jax_float32" in r:
            r["jax_vs_numpy"] = r["jax_float32"]["vs_numpy"]
            r["jax_vs_floor"] = r["jax_float32"]["vs_floor"]
        if "torch_official_loop" in r and "jax_float32" in r:
            r["torch_vs_jax"] = round(
                r["torch_official_loop"]["ms_per_step"] / r["jax_float32"]["ms_per_step"], 3)
    out = {
        "benchmark": "greedy_coreset",
        "smoke": args.smoke,
        "backend": jax.default_backend(),
        "devices": [str(dv) for dv in jax.devices()],
        "jax": jax.__version__,
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "note": "wall-clock, best of --repeats; per-step times are measured over steps_timed "
                "steps and extrapolated to k - 1 steps when extrapolated is true; noisy on a "
                "shared machine",
        "results": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
