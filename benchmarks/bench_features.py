"""Benchmark: PatchCore patch features (WRN-50-2 layer2 + layer3, 224 px) with tailedcore_jax.

Measures, in one process, on random weights (no downloads):

* ``extractor``: ``make_feature_extractor(wide_resnet50_2, ("layer2", "layer3"),
  embedding_layer="pooled")``: backbone + exact PatchCore aggregation + avgpool embedding, one
  jitted call per batch, in float32 and in bfloat16 (backbone in bf16, aggregation in f32);
* baseline ``backbone``: the same model alone (``model.apply(..., taps=("layer2", "layer3",
  "pooled"))`` under ``jax.jit``, same dtype). ``ratio`` = extractor images/s divided by
  backbone images/s (float32): the fraction of throughput left after adding the aggregation
  (1.0 = the aggregation is free);
* ``aggregation``: ``patchcore_features`` alone on (B, 28, 28, 512) / (B, 14, 14, 1024) maps
  against a vectorised NumPy version of the official construction (unfold, bilinear resize of
  every (c, ky, kx) slice, dense adaptive-pool matrices), with the max abs difference;
* bf16 accuracy: relative L2 error of the bf16 patch features / embeddings against float32.

Compile time is reported separately (first call); steady state is the best and median of
``--iters`` timed calls after it, each ending in ``block_until_ready`` with host transfers
disallowed. Prints one JSON object (and writes it to ``--out`` if given).

Usage::

    python benchmarks/bench_features.py --smoke
    python benchmarks/bench_features.py --batch 16 --iters 10 --out features.json
"""

import argparse
import json
import os
import platform
import sys
import time

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tailedcore_jax import features  # noqa: E402
from tailedcore_jax.models import resnet  # noqa: E402


def random_variables(model, image_shape, seed=0):
    """He-scaled random weights from ``jax.eval_shape`` (no compiled init), BN stats sane."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            w = rng.standard_normal(leaf.shape, np.float32)
            return w * np.float32(np.sqrt(2.0 / fan_in))
        if "var" in name:
            return (0.5 + rng.random(leaf.shape)).astype(np.float32)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, shapes))


def time_calls(fn, iters):
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def measure(fn, x, iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(x))
    compile_s = time.perf_counter() - t0
    with jax.transfer_guard("disallow"):
        best, med = time_calls(lambda: fn(x), iters)
    batch = x.shape[0]
    return out, {
        "compile_plus_first_call_s": compile_s,
        "best_s": best,
        "median_s": med,
        "images_per_s": batch / best,
    }


# ---- NumPy baseline of the aggregation (official construction, vectorised) -------------------


def _np_unfold(x, p=3):
    """(B, h, w, C) -> (B, h, w, C, p, p), zero padding (p-1)//2 (torch Unfold)."""
    pad = (p - 1) // 2
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty((b, h, w, c, p, p), x.dtype)
    for ky in range(p):
        for kx in range(p):
            out[..., ky, kx] = xp[:, ky : ky + h, kx : kx + w, :]
    return out


def _np_resize_matrix(n_in, n_out):
    m = np.zeros((n_out, n_in), np.float32)
    scale = n_in / n_out
    for d in range(n_out):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        lam = src - i0
        m[d, i0] += 1 - lam
        m[d, i1] += lam
    return m


def numpy_patchcore(l2, l3, pretrain_dim=1024, dim=1024):
    b, h, w, _ = l2.shape
    p2 = _np_unfold(l2).reshape(b * h * w, -1)
    p3 = _np_unfold(l3)  # (B, h3, w3, C, 3, 3)
    ry, rx = _np_resize_matrix(l3.shape[1], h), _np_resize_matrix(l3.shape[2], w)
    p3 = np.einsum("yi,bij...->byj...", ry, p3)
    p3 = np.einsum("xj,byj...->byx...", rx, p3).reshape(b * h * w, -1)
    f2 = p2 @ features.adaptive_avg_pool_matrix(p2.shape[1], pretrain_dim)
    f3 = p3 @ features.adaptive_avg_pool_matrix(p3.shape[1], pretrain_dim)
    stacked = np.stack([f2, f3], axis=1).reshape(b * h * w, -1)
    out = stacked @ features.adaptive_avg_pool_matrix(stacked.shape[1], dim)
    return out.reshape(b, h, w, dim)


def run(args):
    model = resnet.ARCHITECTURES[args.arch]()
    shape = (args.size, args.size, 3)
    variables = random_variables(model, shape)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((args.batch, *shape), np.float32))
    report = {
        "benchmark": "bench_features",
        "arch": args.arch,
        "image_size": args.size,
        "batch": args.batch,
        "iters": args.iters,
        "layers": ["layer2", "layer3"],
        "embedding_layer": "pooled",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "note": "random weights; timings on a shared machine are noisy",
        "results": {},
    }
    outs = {}
    taps = ("layer2", "layer3", "pooled")
    for dtype_name in args.dtypes.split(","):
        dt = None if dtype_name == "float32" else jnp.dtype(dtype_name)
        fn = features.make_feature_extractor(model, variables, compute_dtype=dt)
        out, ext = measure(fn, x, args.iters)
        outs[dtype_name] = out
        m = model if dt is None else model.clone(dtype=dt)
        v = variables
        if dt is not None:
            v = {
                **variables,
                "params": jax.tree_util.tree_map(lambda a: a.astype(dt), variables["params"]),
            }
        backbone = jax.jit(lambda vv, xx, m=m: m.apply(vv, xx, train=False, taps=taps))
        _, bb = measure(lambda xx, v=v, backbone=backbone: backbone(v, xx), x, args.iters)
        report["results"][dtype_name] = {
            "extractor": ext,
            "backbone_only": bb,
            "ratio_extractor_over_backbone": ext["images_per_s"] / bb["images_per_s"],
            "patches_shape": list(out["patches"].shape),
            "embedding_shape": list(out["embedding"].shape),
        }
    if "float32" in outs:
        report["ratio"] = report["results"]["float32"]["ratio_extractor_over_backbone"]
        report["ratio_definition"] = "float32 extractor images/s / backbone-only images/s"
        for name, out in outs.items():
            if name == "float32":
                continue
            ref = outs["float32"]
            err = {}
            for k in ("patches", "embedding"):
                a = np.asarray(out[k], np.float64)
                b = np.asarray(ref[k], np.float64)
                err[k + "_rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            pa = np.asarray(out["patches"]).reshape(-1, out["patches"].shape[-1])
            pb = np.asarray(ref["patches"]).reshape(-1, ref["patches"].shape[-1])
            cos = (pa * pb).sum(1) / (np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1))
            err["patches_min_cosine"] = float(cos.min())
            report["results"][name]["accuracy_vs_float32"] = err

    # ---- aggregation alone: JAX vs NumPy ----------------------------------------------------
    acts = jax.jit(lambda vv, xx: model.apply(vv, xx, train=False, taps=("layer2", "layer3")))(
        variables, x[: args.numpy_batch]
    )
    l2, l3 = acts["layer2"], acts["layer3"]
    agg = jax.jit(features.patchcore_features)
    _, agg_stats = measure(lambda a: agg(a, l3), l2, args.iters)
    t0 = time.perf_counter()
    want = numpy_patchcore(np.asarray(l2), np.asarray(l3))
    np_s = time.perf_counter() - t0
    got = np.asarray(agg(l2, l3))
    report["aggregation"] = {
        "batch": int(l2.shape[0]),
        "layer2_shape": list(l2.shape),
        "layer3_shape": list(l3.shape),
        "jax": agg_stats,
        "numpy_s": np_s,
        "numpy_images_per_s": l2.shape[0] / np_s,
        "speedup_jax_over_numpy": np_s / agg_stats["best_s"],
        "max_abs_diff_vs_numpy": float(np.abs(got - want).max()),
        "max_abs_value": float(np.abs(want).max()),
        "max_rel_diff_vs_numpy": float(np.abs(got - want).max() / np.abs(want).max()),
    }
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="tiny run (ResNet-18, 64 px, batch 2)")
    ap.add_argument("--arch", default="wide_resnet50_2", choices=sorted(resnet.ARCHITECTURES))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--numpy-batch", type=int, default=2, help="images for the aggregation baseline"
    )
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.arch, args.size, args.batch, args.iters, args.numpy_batch = "resnet18", 64, 2, 2, 1
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
