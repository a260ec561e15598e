"""Run every benchmark in benchmarks/ at one scale and write one JSON report.

Each benchmark runs as its own subprocess (fresh JAX runtime, its own peak memory), one
after the other (never in parallel: timings would interfere). Its JSON (the last JSON
object it prints) is collected, and the headline numbers are pulled out into a summary:
every ratio against the in-process baselines (keys with ``ratio``/``speedup``/``vs_``/
``_over_``/``minus``), and the achieved rates and physical floors (``gflops``,
``gb_per_s``, ``floor``).

Scales:

* ``--smoke``: each script's ``--smoke`` (seconds each; CI).
* ``--cpu`` (default): each script's defaults (sized for a 2-core CPU), ``bench_scale`` at
  640k patches (10-30 min on 2 cores).
* ``--accelerator``: paper sizes: greedy coreset at N = 200k and 640k, kNN with 784 query
  patches per image against 20k-300k bank rows, LOF at 800 images x 784 positions,
  TailedCore memory at 640k patches; the scripts report achieved bandwidth (coreset: GB/s
  over its floor) and FLOP/s (kNN) themselves.

Scripts without size flags for the accelerator scale run at their defaults (noted in the
report): ``bench_tailsampler`` (sizes up to 5000 images already are the paper's),
``bench_tail_noise`` (a fixed synthetic study), ``bench_features`` (its default is the
paper's WRN-50-2 at 224 px; the batch is raised to 64).

Usage:
    python benchmarks/run_all.py --smoke --out /tmp/bench_smoke.json
    python benchmarks/run_all.py --cpu --only bench_knn,bench_coreset
    python benchmarks/run_all.py --accelerator --out bench_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> extra arguments per scale (None: the script's defaults).
PLAN = {
    "bench_knn": {
        "smoke": ["--smoke"],
        "cpu": [],
        "accelerator": ["--sizes", "20000,100000,300000", "--images", "8", "--ks", "1,9"],
    },
    "bench_coreset": {
        "smoke": ["--smoke"],
        "cpu": [],
        # 2000 timed steps per method, extrapolated to the full k = 10 % of N by the script
        # (the numpy/torch baselines run on the host CPU and would take hours at full k).
        "accelerator": ["--sizes", "200000,640000", "--steps", "2000"],
    },
    "bench_lof": {
        "smoke": ["--smoke"],
        "cpu": [],
        "accelerator": ["--images", "800", "--positions", "784", "--dim", "128"],
    },
    "bench_tailsampler": {"smoke": ["--smoke"], "cpu": [], "accelerator": []},
    "bench_features": {"smoke": ["--smoke"], "cpu": [], "accelerator": ["--batch", "64"]},
    "bench_tail_noise": {"smoke": ["--smoke"], "cpu": [], "accelerator": []},
    "bench_scale": {
        "smoke": ["--smoke"],
        "cpu": ["--patches", "640000"],
        "accelerator": ["--patches", "640000", "--mode", "both"],
    },
}
NO_SIZE_FLAGS = {
    "bench_tailsampler": "no accelerator-specific sizes needed (defaults go to 5000 images)",
    "bench_tail_noise": "fixed synthetic study; no size flags",
}

_RATIO_KEY = re.compile(r"ratio|speedup|vs_|_over_|minus|agree")
_RATE_KEY = re.compile(r"gflops|gflop_per_s|gb_per_s|bandwidth|floor|images_per_s|per_s$")


def last_json(text: str):
    """The last top-level JSON object printed (single-line or indented)."""
    text = text.strip()
    try:
        return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        pass
    starts = [m.start() for m in re.finditer(r"(?m)^\{", text)]
    for s in reversed(starts):
        try:
            return json.loads(text[s:])
        except (ValueError, json.JSONDecodeError):
            continue
    return None


def pick(obj, pattern, prefix=""):
    """Flatten ``obj`` into {dotted.key: number} for keys matching ``pattern``."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and pattern.search(str(k)):
                out[path] = v
            elif isinstance(v, (dict, list)):
                out.update(pick(v, pattern, path))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(pick(v, pattern, f"{prefix}[{i}]"))
    return out


def run_one(name, args, timeout, env):
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = round(time.perf_counter() - t0, 1)
    result = last_json(out)
    entry = {
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "wall_s": seconds,
        "ratios": pick(result, _RATIO_KEY) if result else {},
        "rates_and_floors": pick(result, _RATE_KEY) if result else {},
        "json": result,
    }
    if rc != 0 or result is None:
        entry["stderr_tail"] = err[-3000:]
        entry["stdout_tail"] = out[-2000:]
    return entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--smoke", action="store_true", help="every script's --smoke")
    scale.add_argument("--cpu", action="store_true", help="CPU sizes (default)")
    scale.add_argument("--accelerator", action="store_true", help="paper sizes on GPU/TPU")
    ap.add_argument("--only", default="", help="comma-separated subset of benchmarks")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default 600 smoke, 7200 otherwise)")
    ap.add_argument("--out", default=None, help="write the report here (also printed)")
    args = ap.parse_args(argv)
    level = "smoke" if args.smoke else ("accelerator" if args.accelerator else "cpu")
    timeout = args.timeout or (600 if level == "smoke" else 7200)

    names = [n for n in PLAN if (HERE / f"{n}.py").exists()]
    missing = [n for n in PLAN if not (HERE / f"{n}.py").exists()]
    extra = sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in PLAN)
    names += extra  # benchmarks added later run with their defaults / --smoke
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    if args.skip:
        names = [n for n in names if n not in args.skip.split(",")]

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    report = {
        "benchmark": "run_all",
        "scale": level,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "missing_scripts": missing,
        "notes": {n: NO_SIZE_FLAGS[n] for n in names if n in NO_SIZE_FLAGS and level != "smoke"},
        "results": {},
    }
    t0 = time.perf_counter()
    for name in names:
        plan = PLAN.get(name, {"smoke": ["--smoke"], "cpu": [], "accelerator": []})
        print(f"[run_all] {name} {' '.join(plan[level])}", file=sys.stderr, flush=True)
        entry = run_one(name, plan[level], timeout, env)
        report["results"][name] = entry
        print(f"[run_all] {name}: rc={entry['returncode']} {entry['wall_s']} s",
              file=sys.stderr, flush=True)
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    report["loadavg_end"] = list(os.getloadavg())
    report["all_ok"] = all(e["returncode"] == 0 and e["json"] is not None
                           for e in report["results"].values())
    report["summary"] = {n: {"ratios": e["ratios"], "rates_and_floors": e["rates_and_floors"]}
                         for n, e in report["results"].items()}
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
