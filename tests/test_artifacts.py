from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cascade import artifacts as A


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    A.write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with A.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert A.read_json(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_manifest_hashes_detect_truncation_and_alteration(tmp_path):
    A.write_npz(tmp_path / "a.npz", x=np.arange(10))
    A.write_text(tmp_path / "b.txt", "hello")
    m = A.write_manifest(tmp_path, kind="s", config={"k": 1}, seed=0, inputs={}, outputs=["a.npz", "b.txt"])
    assert m["outputs"]["b.txt"] == A.sha256_bytes(b"hello")
    A.read_manifest(tmp_path)  # verifies
    with open(tmp_path / "a.npz", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "a.npz") - 5)
    with pytest.raises(A.ArtifactError, match="a.npz.*truncated or altered"):
        A.read_manifest(tmp_path)
    m = A.write_manifest(tmp_path, kind="s", config={"k": 1}, seed=0, inputs={}, outputs=["a.npz", "b.txt"])
    (tmp_path / "b.txt").unlink()
    with pytest.raises(A.ArtifactError, match="b.txt"):
        A.verify_outputs(tmp_path, m)


def test_torch_checkpoints_load_weights_only(tmp_path):
    A.save_torch(tmp_path / "ok.pt", {"w": torch.ones(2)})
    assert torch.equal(A.load_torch(tmp_path / "ok.pt")["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|not allowed"):
        A.load_torch(tmp_path / "evil.pt")


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "/abs", "", ".hidden", "x" * 200])
def test_run_names_cannot_escape(bad):
    with pytest.raises(ValueError):
        A.check_run_name(bad)


def test_safe_join_refuses_escape(tmp_path):
    assert A.safe_join(tmp_path, "run1", "teacher") == (tmp_path / "run1" / "teacher").resolve()
    with pytest.raises(ValueError, match="escapes"):
        A.safe_join(tmp_path, "..", "x")
    with pytest.raises(ValueError, match="escapes"):
        A.safe_join(tmp_path, "/etc")


def test_every_json_file_is_strict_json(tmp_path):
    # NaN / inf become null, numpy scalars and arrays plain numbers and lists, tuples lists, keys strings
    p = A.write_json(tmp_path / "m.json", {"auc": float("nan"), "p99": np.float32(np.inf), "n": np.int64(3),
                                           "ids": np.arange(2), "ks": (1, 5), 7: "x", "name": "café"})
    text = p.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text and "café" in text
    assert A.read_json(p) == {"auc": None, "p99": None, "n": 3, "ids": [0, 1], "ks": [1, 5], "7": "x", "name": "café"}
    with pytest.raises(ValueError, match=r"obj\['bad'\]: a set cannot go into JSON"):
        A.write_json(tmp_path / "bad.json", {"bad": {1, 2}})
