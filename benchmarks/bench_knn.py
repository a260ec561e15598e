"""Benchmark: exact kNN scoring (PatchCore hot path) -- tailedcore_jax vs NumPy vs faiss-cpu.

Setting (the scoring shape of the paper scale): ``784 * B`` query patches (B images of a
28 x 28 patch grid) against memory banks of 20k..100k rows, d = 1024, k = 1 and k = 9.

Compared in the same process, on the same float32 data:

* ``library``: ``tailedcore_jax.nearest_neighbors`` under ``jax.jit`` (warm; compile time
  reported separately), bank norms pre-computed with ``sq_norms`` as a fitted bank would be;
* ``numpy``: brute force chunked the same way (BLAS sgemm per block, then a running
  ``argmin`` for k = 1 or ``argpartition`` + sort for k > 1), half-norm ranking key;
* ``faiss``: ``faiss.IndexFlatL2.search`` (the PatchCore reference), when importable.

Reported per (bank rows, k): seconds per call, ms per image, GFLOP/s (``2 Q M D / t``),
peak memory (RSS increase sampled during one extra call for every method; plus XLA's
temp-buffer size for the library and tracemalloc's peak for NumPy), agreement of the
neighbours between methods, and the ratios library/faiss and library/numpy (< 1 means the
library is faster). Prints one JSON object (and writes it to ``--out`` if given).

Usage::

    python benchmarks/bench_knn.py --smoke
    python benchmarks/bench_knn.py --sizes 20000,50000,100000 --images 2 --out knn.json
"""

import argparse
import functools
import json
import os
import platform
import resource
import sys
import threading
import time
import tracemalloc

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from tailedcore_jax.knn import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    nearest_neighbors,
    sq_norms,
)

PATCHES_PER_IMAGE = 784  # 28 x 28 layer2 grid at 224 px


# ---------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------


def numpy_knn(queries, bank, half_norms, k, query_chunk, bank_chunk):
    """Chunked brute force with BLAS: same blocking and ranking key as the library."""
    m, n = len(queries), len(bank)
    out_d = np.empty((m, k), np.float32)
    out_i = np.empty((m, k), np.int64)
    for qs in range(0, m, query_chunk):
        q = queries[qs : qs + query_chunk]
        rows = len(q)
        best_r = np.full((rows, k), np.inf, np.float32)
        best_i = np.full((rows, k), -1, np.int64)
        for bs in range(0, n, bank_chunk):
            block = q @ bank[bs : bs + bank_chunk].T  # sgemm
            np.subtract(half_norms[bs : bs + bank_chunk], block, out=block)  # r = |b|^2/2 - q.b
            if k == 1:
                i = np.argmin(block, axis=1)
                r = block[np.arange(rows), i]
                better = r < best_r[:, 0]
                best_r[better, 0] = r[better]
                best_i[better, 0] = i[better] + bs
            else:
                if block.shape[1] > k:  # per-block top-k first, then merge k + k columns
                    blk_i = np.argpartition(block, k - 1, axis=1)[:, :k]
                    block = np.take_along_axis(block, blk_i, axis=1)
                else:
                    blk_i = np.broadcast_to(np.arange(block.shape[1]), block.shape)
                cat = np.concatenate([best_r, block], axis=1)
                cat_i = np.concatenate([best_i, blk_i + bs], axis=1)
                part = np.argpartition(cat, k - 1, axis=1)[:, :k]
                part_r = np.take_along_axis(cat, part, axis=1)
                order = np.argsort(part_r, axis=1, kind="stable")
                best_r = np.take_along_axis(part_r, order, axis=1)
                best_i = np.take_along_axis(np.take_along_axis(cat_i, part, axis=1), order, axis=1)
        qq = np.einsum("ij,ij->i", q, q)[:, None]
        out_d[qs : qs + rows] = np.maximum(qq + 2.0 * best_r, 0.0)
        out_i[qs : qs + rows] = best_i
    return out_d, out_i


# ---------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _library_call(compiled, queries, bank, norms):
    return jax.block_until_ready(compiled(queries, bank, bank_sq_norms=norms))


def peak_rss_increase(fn, results):
    """Run ``fn`` once (its result appended to ``results``); return the peak RSS increase
    (bytes) over the RSS before the call, sampled every 2 ms."""
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        results.append(fn())
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base


def time_calls(fn, repeats):
    """Warm-up call excluded; returns (best wall, median wall, best process CPU) seconds.

    Process CPU time (all threads of this process) is less sensitive than wall time to
    other processes competing for the cores; spinning OpenMP threads (faiss) inflate it.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), float(np.median(wall)), min(cpu)


def _agreement(idx_a, idx_b):
    return float(np.mean(np.asarray(idx_a) == np.asarray(idx_b)))


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def run(args):
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(s) for s in args.ks.split(",")]
    m = PATCHES_PER_IMAGE * args.images
    d = args.dim
    # Data resembling WRN-50 patch features: non-negative, correlated (post-ReLU pooling).
    queries = np.abs(rng.standard_normal((m, d), np.float32))
    bank_all = np.abs(rng.standard_normal((max(sizes), d), np.float32))

    try:
        import faiss

        faiss_note = f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}"
    except ImportError as e:  # pragma: no cover - depends on the environment
        faiss = None
        faiss_note = f"faiss-cpu not importable ({e}); faiss columns skipped"

    results = []
    for n in sizes:
        bank = np.ascontiguousarray(bank_all[:n])
        flop = 2.0 * m * n * d
        half = 0.5 * np.einsum("ij,ij->i", bank, bank)
        q_dev, b_dev = jax.device_put(queries), jax.device_put(bank)
        norms_dev = jax.block_until_ready(sq_norms(b_dev))
        for k in ks:
            row = {"bank_rows": n, "k": k, "queries": m, "images": args.images, "dim": d}

            # -- library --------------------------------------------------------------
            f = jax.jit(
                functools.partial(
                    nearest_neighbors,
                    k=k,
                    query_chunk=args.query_chunk,
                    bank_chunk=args.bank_chunk,
                )
            )
            t0 = time.perf_counter()
            compiled = f.lower(q_dev, b_dev, bank_sq_norms=norms_dev).compile()
            row["library_compile_s"] = time.perf_counter() - t0
            call = functools.partial(_library_call, compiled, q_dev, b_dev, norms_dev)
            out = []
            # the warm-up call (not timed) is the memory probe
            row["library_peak_rss_mb"] = peak_rss_increase(call, out) / 2**20
            lib_d, lib_i = out[0]
            with jax.transfer_guard("disallow"):
                best, med, cpu = time_calls(call, args.repeats)
            row["library_s"], row["library_median_s"], row["library_cpu_s"] = best, med, cpu
            try:
                mem = compiled.memory_analysis()
                row["library_xla_temp_mb"] = mem.temp_size_in_bytes / 2**20
            except (AttributeError, NotImplementedError, RuntimeError):  # backend dependent
                row["library_xla_temp_mb"] = None
            lib_i = np.asarray(lib_i)
            lib_d = np.asarray(lib_d)

            # -- numpy ------------------------------------------------------------------
            if not args.no_numpy:
                qc = min(args.query_chunk, m)
                bc = min(args.bank_chunk, n)
                ncall = functools.partial(numpy_knn, queries, bank, half, k, qc, bc)
                out = []
                tracemalloc.start()  # warm-up call (not timed) doubles as the memory probe
                row["numpy_peak_rss_mb"] = peak_rss_increase(ncall, out) / 2**20
                row["numpy_tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                np_d, np_i = out[0]
                best, med, cpu = time_calls(ncall, args.repeats)
                row["numpy_s"], row["numpy_median_s"], row["numpy_cpu_s"] = best, med, cpu
                row["agree_idx_library_numpy"] = _agreement(lib_i, np_i)
                row["max_abs_diff_dist_library_numpy"] = float(np.max(np.abs(lib_d - np_d)))

            # -- faiss ------------------------------------------------------------------
            if faiss is not None and not args.no_faiss:
                index = faiss.IndexFlatL2(d)
                index.add(bank)
                fcall = functools.partial(index.search, queries, k)
                out = []
                row["faiss_peak_rss_mb"] = peak_rss_increase(fcall, out) / 2**20
                fa_d, fa_i = out[0]
                best, med, cpu = time_calls(fcall, args.repeats)
                row["faiss_s"], row["faiss_median_s"], row["faiss_cpu_s"] = best, med, cpu
                row["agree_idx_library_faiss"] = _agreement(lib_i, fa_i)
                row["max_abs_diff_dist_library_faiss"] = float(np.max(np.abs(lib_d - fa_d)))
                del index

            for name in ("library", "numpy", "faiss"):
                if f"{name}_s" in row:
                    row[f"{name}_ms_per_image"] = 1e3 * row[f"{name}_s"] / args.images
                    row[f"{name}_gflops"] = flop / row[f"{name}_s"] / 1e9
            for base in ("faiss", "numpy"):
                if f"{base}_s" in row:
                    row[f"ratio_library_over_{base}"] = row["library_s"] / row[f"{base}_s"]
                    row[f"cpu_ratio_library_over_{base}"] = (
                        row["library_cpu_s"] / row[f"{base}_cpu_s"]
                    )
            results.append(row)
            print(json.dumps({k_: _round(v) for k_, v in row.items()}), flush=True, file=sys.stderr)

    return {
        "benchmark": "knn",
        "setting": "784*images query patches vs bank_rows x dim memory bank, exact squared L2",
        "smoke": args.smoke,
        "query_chunk": args.query_chunk,
        "bank_chunk": args.bank_chunk,
        "repeats": args.repeats,
        "timing": "best of `repeats` warm calls (median also given); compile timed separately; "
        "*_cpu_s = process CPU time of the fastest call (all threads), cpu_ratio_* from it",
        "memory": "*_peak_rss_mb: peak RSS increase sampled every 2 ms during the (untimed) "
        "warm-up call; allocator reuse can hide buffers (faiss shows ~0). More reliable: "
        "library_xla_temp_mb (XLA temp buffers of the compiled call) and "
        "numpy_tracemalloc_peak_mb (tracemalloc peak of the NumPy baseline)",
        "faiss_note": "faiss-cpu wheels bundle their own OpenBLAS (libopenblaso 0.3.15 here), "
        "separate from NumPy's; OpenMP threads spin, so faiss degrades most under CPU load",
        "env": {
            "jax": jax.__version__,
            "numpy": np.__version__,
            "backend": jax.default_backend(),
            "devices": [str(dv) for dv in jax.devices()],
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": args.loadavg_start,
            "loadavg_end": list(os.getloadavg()),
            "faiss": faiss_note,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "results": [{k_: _round(v) for k_, v in r.items()} for r in results],
    }


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    p.add_argument("--sizes", default="20000,50000,100000", help="bank rows, comma separated")
    p.add_argument("--images", type=int, default=2, help="query images (784 patches each)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ks", default="1,9")
    p.add_argument("--query-chunk", type=int, default=DEFAULT_QUERY_CHUNK)
    p.add_argument("--bank-chunk", type=int, default=DEFAULT_BANK_CHUNK)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--no-numpy", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.loadavg_start = list(os.getloadavg())
    if args.smoke:
        args.sizes, args.images, args.dim, args.repeats = "2000,5000", 1, 128, 2
    out = run(args)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
