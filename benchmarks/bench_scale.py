"""Benchmark: TailedCore memory fit at paper scale (640k patches x 1024) on one machine.

Generates a long-tail mixture of patch features directly on the device (no backbone, no
host copy): ``N = patches / positions`` images of ``positions`` patches of ``dim`` floats,
image classes of geometric sizes (a few head classes, many small tail classes), patch
feature = class centre + position offset + noise, image embedding = class centre + noise.
Then runs :func:`tailedcore_jax.memory.fit_tailedcore` as its public paper steps, one by one,
with the same key splits (TailSampler, tail rows, tail coreset, LOF projection + patch-wise
LOF, LOF filter, head coreset, merge), and reports per
stage: wall time, the peak resident memory of the process during the stage (sampled every
20 ms from /proc/self/status) and ``ru_maxrss`` after it. ``--mode fit`` instead runs
``fit_tailedcore`` as one call (total time and peak only); ``--smoke`` runs both and checks
that they give the same bank.

Baselines / floors measured in the same process: the size of one copy of the patch
features (peak RSS is reported as a multiple of it), the streaming bandwidth of this
machine on the projected ``(p, N)`` matrix (the greedy coreset reads it once per step, so
``steps * p * N * 4 B / bandwidth`` is its floor), and the f32 GEMM rate (the LOF Gram
matrices' floor).

Usage:
    python benchmarks/bench_scale.py --smoke                 # seconds
    python benchmarks/bench_scale.py                         # 640k x 1024 (10-30 min, 2 cores)
    python benchmarks/bench_scale.py --patches 200000 --mesh-devices 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import threading
import time

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class PeakSampler:
    """Background thread that records the peak VmRSS between ``start()`` and ``stop()``."""

    def __init__(self, interval=0.02):
        self.interval = interval
        self.peak = 0
        self._run = False
        self._thread = None

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def start(self):
        self.peak = _rss_bytes()
        self._run = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._run = False
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def _gb(x) -> float:
    return round(x / 1e9, 3)


def _block(tree):
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def make_data(key, *, images, positions, dim, emb_dim, num_classes):
    """Long-tail mixture, generated image by image inside one jit (output written once)."""
    sizes = np.maximum(1, np.round(images * 0.5 ** np.arange(num_classes) / 2.0)).astype(int)
    sizes[0] += images - sizes.sum()
    if sizes[0] < 1:
        sizes = np.ones(num_classes, int)
        sizes[0] = images - (num_classes - 1)
    labels = np.repeat(np.arange(num_classes), sizes)[:images].astype(np.int32)
    k_c, k_p, k_e, k_n = jax.random.split(key, 4)

    @jax.jit
    def gen(labels):
        centres = jax.random.normal(k_c, (num_classes, dim), jnp.float32)
        pos = 0.5 * jax.random.normal(k_p, (positions, dim), jnp.float32)

        def one(i):
            noise = 0.5 * jax.random.normal(jax.random.fold_in(k_n, i), (positions, dim))
            return centres[labels[i]][None, :] + pos + noise

        feats = jax.lax.map(one, jnp.arange(images, dtype=jnp.int32))
        emb = centres[labels][:, :emb_dim] + 0.05 * jax.random.normal(k_e, (images, emb_dim))
        return feats, emb

    feats, emb = gen(jnp.asarray(labels))
    return _block(feats), _block(emb), labels


def stream_bandwidth(n, p, repeats=3):
    """GB/s of a streaming read of a (p, n) float32 matrix (vector-matrix product)."""
    xt = jnp.ones((p, n), jnp.float32)
    c = jnp.ones((p,), jnp.float32)
    f = jax.jit(lambda c, xt: jnp.dot(c, xt, precision=jax.lax.Precision.HIGHEST))
    f(c, xt).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(c, xt).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del xt
    return p * n * 4 / best / 1e9


def gemm_gflops(size=1024, repeats=3):
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def run_stages(key, feats, emb, *, ratio, lof_k, lof_drop, projection_dim, lof_projection_dim,
               mesh, report):
    """memory.fit_tailedcore as its public paper steps, one stage at a time (same key splits)."""
    from tailedcore_jax import lof as lof_mod
    from tailedcore_jax import memory
    from tailedcore_jax.tailsampler import tail_sample_mask

    sampler = PeakSampler()

    def stage(name, fn):
        sampler.start()
        t0 = time.perf_counter()
        out = _block(fn())
        dt = time.perf_counter() - t0
        peak = sampler.stop()
        report[name] = {"seconds": round(dt, 2), "peak_rss_gb": _gb(peak),
                        "ru_maxrss_gb": _gb(_maxrss_bytes())}
        print(json.dumps({"stage": name, **report[name]}), flush=True)
        return out

    key_lof, key_head, key_tail = jax.random.split(key, 3)
    tail_mask, _ = stage("tail_sampler", lambda: tail_sample_mask(emb))
    rows, row_mask = stage("tail_rows", lambda: memory.tail_rows(feats, tail_mask))
    tail = stage("tail_coreset", lambda: memory.coreset_rows(
        key_tail, rows, row_mask, ratio=ratio, projection_dim=projection_dim, allow_empty=True,
        mesh=mesh))
    lof = stage("lof", lambda: memory.lof_scores(
        key_lof, feats, k=lof_k, projection_dim=lof_projection_dim, mesh=mesh))
    keep = stage("lof_filter", lambda: lof_mod.lof_filter_mask(lof, drop=lof_drop))
    head = stage("head_coreset", lambda: memory.coreset_rows(
        key_head, feats, keep.reshape(-1), ratio=ratio, projection_dim=projection_dim,
        mesh=mesh))
    bank = stage("merge", lambda: memory.MemoryBank(
        jnp.concatenate([tail.features, head.features]), jnp.concatenate([tail.valid, head.valid]),
        None, jnp.concatenate([jnp.ones_like(tail.valid), jnp.zeros_like(head.valid)])))
    return bank, {"tail_images": int(np.asarray(tail_mask).sum()),
                  "lof_kept": int(np.asarray(keep).sum()),
                  "tail_rows_valid": int(np.asarray(tail.valid).sum()),
                  "head_rows_valid": int(np.asarray(head.valid).sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    ap.add_argument("--patches", type=int, default=640_000, help="total training patches")
    ap.add_argument("--positions", type=int, default=784, help="patches per image (28 x 28)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--emb-dim", type=int, default=256, help="TailSampler embedding dimension")
    ap.add_argument("--classes", type=int, default=12, help="mixture classes (long-tail sizes)")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--mode", choices=["stages", "fit", "both"], default="stages")
    ap.add_argument("--mesh-devices", type=int, default=0,
                    help="0: no mesh (single-device path); m > 0: mesh= of the first m devices")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.patches, args.positions, args.dim, args.emb_dim = 40 * 49, 49, 64, 16
        args.projection_dim, args.classes, args.mode = 16, 6, "both"

    from tailedcore_jax import memory

    images = max(8, args.patches // args.positions)
    patches = images * args.positions
    mesh = None
    if args.mesh_devices:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[: args.mesh_devices]), ("x",))
    feat_bytes = patches * args.dim * 4
    bw = stream_bandwidth(patches, args.projection_dim)
    gflops = gemm_gflops(512 if args.smoke else 1024)
    rss0 = _rss_bytes()

    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    feats, emb, _ = make_data(jax.random.key(0), images=images, positions=args.positions,
                                   dim=args.dim, emb_dim=args.emb_dim, num_classes=args.classes)
    gen = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gb": _gb(sampler.stop()),
           "ru_maxrss_gb": _gb(_maxrss_bytes())}
    print(json.dumps({"stage": "generate", **gen}), flush=True)

    key = jax.random.key(1)
    kw = {"ratio": args.ratio, "lof_k": 6, "lof_drop": 0.15, "projection_dim": args.projection_dim,
          "lof_projection_dim": 128 if args.dim > 128 else None}
    stages = {"generate": gen}
    info = {}
    total = None
    if args.mode in ("stages", "both"):
        t0 = time.perf_counter()
        bank, info = run_stages(key, feats, emb, mesh=mesh, report=stages, **kw)
        total = time.perf_counter() - t0
    fit = None
    if args.mode in ("fit", "both"):
        sampler.start()
        t0 = time.perf_counter()
        bank_fit = _block(memory.fit_tailedcore(key, feats, emb, mesh=mesh, **kw))
        fit = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gb": _gb(sampler.stop()),
               "ru_maxrss_gb": _gb(_maxrss_bytes())}
        print(json.dumps({"stage": "fit_tailedcore", **fit}), flush=True)
        if args.mode == "both":
            same = all(np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip(jax.tree.leaves(bank), jax.tree.leaves(bank_fit)))
            fit["stages_equal_fit_tailedcore"] = bool(same)
            if not same:
                raise SystemExit("stage-by-stage bank differs from fit_tailedcore")

    n_rows = patches
    head_steps = max(1, info.get("lof_kept", int(0.85 * n_rows)) * args.ratio)
    core_floor = head_steps * args.projection_dim * n_rows * 4 / (bw * 1e9)
    lof_flops = args.positions * 2.0 * images**2 * 128
    peak = _maxrss_bytes()
    out = {
        "benchmark": "bench_scale",
        "smoke": bool(args.smoke),
        "patches": patches, "images": images, "positions": args.positions, "dim": args.dim,
        "mesh_devices": args.mesh_devices, "mode": args.mode,
        "devices": [str(d) for d in jax.devices()[:1]], "cpu_count": os.cpu_count(),
        "feature_copy_gb": _gb(feat_bytes),
        "rss_before_data_gb": _gb(rss0),
        "peak_rss_gb": _gb(peak),
        "peak_rss_over_feature_copy": round(peak / feat_bytes, 2),
        "peak_extra_over_one_copy_gb": _gb(peak - rss0 - feat_bytes),
        "under_16gb": peak < 16e9,
        "stages": stages,
        "fit_tailedcore": fit,
        "stages_total_seconds": None if total is None else round(total, 2),
        **info,
        "floors": {
            "stream_gb_per_s": round(bw, 1),
            "gemm_gflop_per_s": round(gflops, 1),
            "head_coreset_floor_s": round(core_floor, 2),
            "lof_gram_floor_s": round(lof_flops / (gflops * 1e9), 2),
        },
    }
    if "head_coreset" in stages:
        out["head_coreset_over_floor"] = round(stages["head_coreset"]["seconds"] / core_floor, 2)
        out["lof_over_gram_floor"] = round(
            stages["lof"]["seconds"] / (lof_flops / (gflops * 1e9)), 2)
    text = json.dumps(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
