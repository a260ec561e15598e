"""experiments.cache: an entry is reused only while every input it records is unchanged."""

import os

import numpy as np
import pytest

from experiments import cache as C


@pytest.fixture
def inputs_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(bytes([i]) * 10)
    (tmp_path / "w.npz").write_bytes(b"weights-v1")
    return tmp_path


def _entry(d, **config):
    files = sorted(str(p) for p in (d / "data").iterdir())
    return C.fingerprint({"ratio": 0.1, **config}, data_files=files,
                         hashed_files={"weights": str(d / "w.npz"), "absent": None})


def _run(d, logs, value=1.0):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.full((2,), value, np.float32)}

    out = C.cached(d / "cache" / "entry", compute, _entry(d), log=logs.append)
    return out, len(calls)


def test_reused_while_inputs_unchanged(inputs_dir):
    logs = []
    _, n1 = _run(inputs_dir, logs)
    out, n2 = _run(inputs_dir, logs)
    assert (n1, n2) == (1, 0)
    np.testing.assert_array_equal(np.asarray(out["x"]), [1.0, 1.0])
    assert "resumed from cache" in logs[-1]


def test_changed_data_file_recomputes_and_names_it(inputs_dir):
    logs = []
    _run(inputs_dir, logs)
    f = inputs_dir / "data" / "1.png"
    f.write_bytes(b"changed, and longer")
    _, n = _run(inputs_dir, logs)
    assert n == 1
    assert "data file(s) changed" in logs[-1] and str(f) in logs[-1]


def test_same_size_rewrite_is_caught_by_mtime(inputs_dir):
    logs = []
    _run(inputs_dir, logs)
    f = inputs_dir / "data" / "0.png"
    st = os.stat(f)
    f.write_bytes(b"\x07" * 10)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _run(inputs_dir, logs)[1] == 1


def test_replaced_weights_recompute_even_with_old_mtime(inputs_dir):
    logs = []
    _run(inputs_dir, logs)
    w = inputs_dir / "w.npz"
    st = os.stat(w)
    w.write_bytes(b"weights-v2")  # same size, content differs
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    C._hash_file.cache_clear()
    assert _run(inputs_dir, logs)[1] == 1
    assert "weights file changed" in logs[-1]


def test_library_version_change_recomputes(inputs_dir, monkeypatch):
    logs = []
    _run(inputs_dir, logs)
    monkeypatch.setattr(C, "library_fingerprint", lambda: "9.9.9+deadbeef")
    assert _run(inputs_dir, logs)[1] == 1
    assert "library changed" in logs[-1]


def test_config_change_and_missing_record_recompute(inputs_dir):
    logs = []
    _run(inputs_dir, logs)
    calls = []
    C.cached(inputs_dir / "cache" / "entry", lambda: calls.append(1) or {"x": np.zeros(2)},
             _entry(inputs_dir, ratio=0.2), log=logs.append)
    assert calls and "config changed (ratio)" in logs[-1]
    os.remove(inputs_dir / "cache" / "entry.inputs.json")  # e.g. a crash before the record
    assert _run(inputs_dir, logs)[1] == 1
    assert "no record of its inputs" in logs[-1]


def test_library_fingerprint_tracks_sources():
    fp = C.library_fingerprint()
    import tailedcore_jax

    assert fp.startswith(tailedcore_jax.__version__ + "+") and len(fp.split("+")[1]) == 16
