"""Result caches that cannot go stale: every entry records the inputs it was computed from.

An entry is an orbax checkpoint (:mod:`tailedcore_jax.checkpoint`, atomic) plus a sidecar
``<entry>.inputs.json`` holding the fingerprint of everything the value depends on:

* ``config``: the configuration fields that matter (a hash);
* ``library``: the library version and a hash of its source files (an upgrade, or an edit of
  a checkout, invalidates);
* ``files``: for every input file, its size and modification time (data sets: thousands of
  images, cheap to stat), or its content hash (weights, manifests: small in number).

:func:`cached` restores an entry only when the recorded fingerprint equals the current one;
otherwise it says which input changed (``weights file changed: ...``), recomputes and
overwrites. A sidecar is written after its checkpoint, so a crash in between leaves an entry
without a record, which is recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tailedcore_jax import checkpoint

__all__ = ["cached", "file_stats", "content_hash", "library_fingerprint", "fingerprint"]


def file_stats(paths: Iterable[str | os.PathLike]) -> dict[str, list[int]]:
    """``{path: [size, mtime_ns]}`` of every file (``FileNotFoundError`` names a missing one)."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[os.fspath(p)] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


@functools.lru_cache(maxsize=256)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (memoised per size and modification time)."""
    st = os.stat(path)
    return _hash_file(os.fspath(path), int(st.st_size), int(st.st_mtime_ns))


@functools.lru_cache(maxsize=1)
def library_fingerprint() -> str:
    """``<version>+<hash of the library's .py sources>``."""
    import tailedcore_jax

    root = Path(tailedcore_jax.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return f"{tailedcore_jax.__version__}+{h.hexdigest()[:16]}"


def fingerprint(config: Mapping[str, Any], *, data_files: Iterable[str] = (),
                hashed_files: Mapping[str, str | None] | None = None) -> dict:
    """The inputs record of one entry: config hash, library, data file stats, file hashes.

    Args:
        config: the configuration fields the entry depends on (JSON-serialisable values).
        data_files: files fingerprinted by size and modification time.
        hashed_files: ``{role: path or None}`` fingerprinted by content (e.g. ``weights``).
    """
    cfg = json.dumps(dict(config), sort_keys=True, default=str)
    files = file_stats(sorted(set(map(os.fspath, data_files))))
    return {
        "config": hashlib.sha256(cfg.encode()).hexdigest()[:16],
        "config_fields": json.loads(cfg),
        "library": library_fingerprint(),
        "data_files": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
        "data_file_stats": files,
        "hashed_files": {role: (None if p is None else [os.fspath(p), content_hash(p)])
                         for role, p in sorted((hashed_files or {}).items())},
    }


def _why_stale(old: dict, new: dict) -> list[str]:
    reasons = []
    if old.get("config") != new["config"]:
        changed = sorted(k for k in set(old.get("config_fields", {})) | set(new["config_fields"])
                         if old.get("config_fields", {}).get(k) != new["config_fields"].get(k))
        reasons.append("config changed (" + ", ".join(changed[:5]) + ")")
    if old.get("library") != new["library"]:
        reasons.append(f"library changed ({old.get('library')} -> {new['library']})")
    for role, now in new["hashed_files"].items():
        before = old.get("hashed_files", {}).get(role)
        if before != now:
            reasons.append(f"{role} file changed ({before[0] if before else None} -> "
                           f"{now[0] if now else None}, content hash differs)")
    if old.get("data_files") != new["data_files"]:
        a, b = old.get("data_file_stats", {}), new["data_file_stats"]
        changed = [p for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
        reasons.append(f"{len(changed)} data file(s) changed, added or removed (first: "
                       f"{changed[0] if changed else '?'})")
    return reasons


def cached(path: str | os.PathLike, compute: Callable[[], Any], inputs: dict, *,
           log=print, like=None) -> Any:
    """Restore ``path`` if its recorded inputs equal ``inputs``, else compute, save and record."""
    path = Path(path)
    record = Path(f"{path}.inputs.json")
    if checkpoint.exists(path):
        old = json.loads(record.read_text()) if record.is_file() else None
        reasons = ["no record of its inputs"] if old is None else _why_stale(old, inputs)
        if not reasons:
            log(f"  resumed from cache {path}")
            return checkpoint.restore(path) if like is None else checkpoint.restore(path, like=like)
        log(f"  recomputing {path.name}: " + "; ".join(reasons))
    value = compute()
    checkpoint.save(path, value, overwrite=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(inputs, sort_keys=True))
    os.replace(tmp, record)
    return value
