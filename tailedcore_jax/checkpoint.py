"""Atomic orbax checkpoints of pytrees (memory banks, backbone variables, cached features).

``save(path, tree)`` writes the tree with ``orbax.checkpoint.StandardCheckpointer`` into a
temporary sibling directory, adds a small JSON manifest (key paths, shapes and dtypes of every
leaf) and only then renames the directory into place. A crash at any point therefore leaves
either the previous checkpoint untouched or no checkpoint at ``path``: never a directory that
restores partial or wrong data. ``restore(path, like)`` checks the saved manifest against the
structure, shapes and dtypes of ``like`` and raises a ``ValueError`` naming every mismatch
before orbax reads anything.

Host-side module (file I/O); the numeric core never imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

MANIFEST = "tailedcore_jax_manifest.json"
_FORMAT = 1

__all__ = ["save", "restore", "exists", "tree_manifest"]


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(int(s) for s in leaf.shape), np.dtype(leaf.dtype)
    arr = np.asarray(leaf)
    return arr.shape, arr.dtype


def _leaf_entries(tree: Any) -> list[dict]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        shape, dtype = _shape_dtype(leaf)
        out.append({"path": jax.tree_util.keystr(path), "shape": list(shape), "dtype": str(dtype)})
    return out


def tree_manifest(tree: Any) -> dict:
    """The manifest stored beside the arrays: format version, tree structure and leaves."""
    return {
        "format": _FORMAT,
        "treedef": str(jax.tree_util.tree_structure(tree)),
        "leaves": _leaf_entries(tree),
    }


def exists(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete checkpoint written by :func:`save`."""
    return (Path(path) / MANIFEST).is_file()


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> Path:
    """Save ``tree`` (any pytree of arrays / scalars) to the directory ``path`` atomically.

    Args:
        path: target directory (created; its parent must be writable).
        tree: the pytree, e.g. a ``MemoryBank`` or Flax variables.
        overwrite: replace an existing checkpoint at ``path``. The old one is kept until the
            new one is complete, then removed.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing saved is lost).
        ValueError: the tree has no array leaves or a leaf is not array-like.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {path} already exists; pass overwrite=True to replace it")
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("cannot save an empty pytree (no array leaves)")
    for leaf in leaves:
        if not hasattr(leaf, "shape") and not np.isscalar(leaf):
            raise ValueError(f"pytree leaf of type {type(leaf).__name__} is not an array or scalar")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # Orbax needs arrays it can serialise: turn Python scalars into 0-d numpy arrays.
        tree = jax.tree_util.tree_map(lambda x: x if hasattr(x, "shape") else np.asarray(x), tree)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "state", tree)
            ckptr.wait_until_finished()
        # The manifest is written last: its presence marks the checkpoint complete.
        (tmp / MANIFEST).write_text(json.dumps(tree_manifest(tree), indent=1))
        if path.exists():
            backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _compare(saved: dict, like: Any) -> list[str]:
    want = tree_manifest(like)
    problems = []
    saved_leaves = {e["path"]: e for e in saved["leaves"]}
    like_leaves = {e["path"]: e for e in want["leaves"]}
    for p in saved_leaves.keys() - like_leaves.keys():
        problems.append(f"saved leaf {p or '<root>'} has no counterpart in `like`")
    for p in like_leaves.keys() - saved_leaves.keys():
        problems.append(f"`like` leaf {p or '<root>'} is missing from the checkpoint")
    for p in sorted(saved_leaves.keys() & like_leaves.keys()):
        s, w = saved_leaves[p], like_leaves[p]
        if s["shape"] != w["shape"]:
            problems.append(f"leaf {p}: saved shape {tuple(s['shape'])} != expected {tuple(w['shape'])}")
        if s["dtype"] != w["dtype"]:
            problems.append(f"leaf {p}: saved dtype {s['dtype']} != expected {w['dtype']}")
    if not problems and saved["treedef"] != want["treedef"]:
        problems.append(f"tree structure differs: saved {saved['treedef']} vs expected {want['treedef']}")
    return problems


def restore(path: str | os.PathLike, like: Any = None) -> Any:
    """Restore a checkpoint written by :func:`save`.

    Args:
        path: the checkpoint directory.
        like: a pytree with the expected structure (arrays or ``jax.ShapeDtypeStruct``
            leaves). When given, the result has exactly that structure (NamedTuples included)
            and every leaf's shape and dtype are checked first. Without it, orbax's raw nested
            dict/list structure is returned.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint is incomplete, or does not match ``like`` (every mismatch
            is listed).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ValueError(
            f"{path} is not a complete tailedcore_jax checkpoint (missing {MANIFEST}); "
            "it may come from an interrupted save or another tool"
        )
    saved = json.loads(manifest_file.read_text())
    if saved.get("format") != _FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {saved.get('format')!r}")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(path / "state")
        problems = _compare(saved, like)
        if problems:
            raise ValueError(
                f"checkpoint {path} does not match the requested structure:\n  - "
                + "\n  - ".join(problems)
            )
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(*_shape_dtype(x)), like)
        return ckptr.restore(path / "state", abstract)
