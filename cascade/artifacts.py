"""Run folders, atomic writes, hashes and manifests.

Every artifact is written to a temporary file in the same folder and then renamed into place, so a process
killed midway never leaves a half-written file under the final name. Each step folder carries a
``manifest.json`` listing its outputs with their sha256; :func:`verify_outputs` re-hashes them on load and
reports a truncated or altered file by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MANIFEST = "manifest.json"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(RuntimeError):
    """A missing, truncated or altered artifact, or a manifest that does not match."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (config hashes)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> Path:
    """Write ``to_jsonable(obj)`` as strict JSON (NaN / inf as null), indented, atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)
    return write_text(path, text + "\n")


def to_jsonable(obj: Any, path: str = "obj") -> Any:
    """A copy of ``obj`` made of plain JSON types: NaN / inf -> None (strict JSON has no NaN), numpy scalars and
    arrays -> Python values and lists, tuples -> lists, Path -> str, dict keys -> str. Anything else raises
    ValueError naming its path. Every JSON file the project writes goes through it (:func:`write_json`)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{path}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), path)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    raise ValueError(f"{path}: a {type(obj).__name__} cannot go into JSON (use plain dicts, lists and numbers)")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); the file is truncated or altered") from None


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load arrays saved by :func:`write_npz`; never unpickles objects."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_torch(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """torch.save ``state`` atomically. Saved through a buffer: torch names the zip's folder after the file it
    writes, so saving to the temporary file would put its random name into the bytes; equal tensors give equal
    files (and sha256), which keeps a redone step's downstream cache valid."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike) -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no arbitrary pickle."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("cascade-distill", "torch", "numpy", "pandas", "pyarrow", "lightgbm", "scikit-learn", "faiss-cpu",
                "faiss-gpu-cu12"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def check_run_name(name: str) -> str:
    """Run names become folder names under the runs root; refuse anything that could escape it."""
    if not _RUN_NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"run name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (no path separators, not '..')"
        )
    return name


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse a result outside ``root`` (e.g. through '..' or an absolute part)."""
    root_r = Path(root).resolve()
    p = root_r.joinpath(*parts).resolve()
    if p != root_r and root_r not in p.parents:
        raise ValueError(f"path {'/'.join(parts)!r} escapes the folder {root}")
    return p


def write_manifest(
    folder: str | os.PathLike,
    *,
    kind: str,
    config: Any,
    seed: int | None,
    inputs: Mapping[str, str],
    outputs: list[str],
    metrics: Mapping[str, Any] | None = None,
    wall_s: float | None = None,
    extra: Mapping[str, Any] | None = None,
    stamp: bool = True,
) -> dict:
    """Write ``folder/manifest.json`` listing ``outputs`` (paths relative to folder) with their sha256.

    kind: what wrote the folder (a pipeline step's name, "fit", "encode_stream", ...). The manifest is written
    last, so its presence marks a complete folder. stamp: record the time it was written and the machine
    (:func:`cascade.machine.machine_record`: CPU model and flags, what torch reports, threads); a manifest that is
    itself the output of a pipeline step passes False (and no timings), so that redoing the step unchanged
    writes the same bytes.
    """
    folder = Path(folder)
    manifest = {
        "kind": kind,
        "config": config,
        "config_hash": stable_hash(config),
        "seed": seed,
        "versions": package_versions(),
        "inputs": dict(inputs),
        "outputs": {rel: sha256_file(folder / rel) for rel in sorted(outputs)},
        "metrics": dict(metrics or {}),
        "wall_s": wall_s,
    }
    if stamp:
        from cascade.machine import machine_record  # imports torch: only where a stamped manifest is written

        manifest["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest["machine"] = machine_record()
    if extra:
        manifest.update(extra)
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict:
    folder = Path(folder)
    m = read_json(folder / MANIFEST)
    if verify:
        verify_outputs(folder, m)
    return m


def verify_outputs(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Re-hash every output listed in the manifest; raise ArtifactError naming the first bad file."""
    folder = Path(folder)
    for rel, digest in manifest.get("outputs", {}).items():
        p = folder / rel
        if not p.exists():
            raise ArtifactError(f"{p}: listed in {folder / MANIFEST} but missing")
        got = sha256_file(p)
        if got != digest:
            raise ArtifactError(
                f"{p}: sha256 {got[:12]}... does not match the manifest's {digest[:12]}...: the "
                "file is truncated or altered"
            )


def verify_listed(folder: str | os.PathLike, rels: list[str]) -> None:
    """Check the files ``rels`` (paths relative to ``folder``) against ``folder``'s manifest: each must be listed
    there and have the sha256 it records. Raise ArtifactError naming the first file that is not (unlisted, missing,
    truncated or altered). Cheaper than :func:`read_manifest` (verify=True) when a caller loads a few files of a
    folder that holds many."""
    folder = Path(folder)
    outputs = read_json(folder / MANIFEST).get("outputs", {})
    for rel in rels:
        p = folder / rel
        if rel not in outputs:
            raise ArtifactError(f"{p}: not listed in {folder / MANIFEST}, so it cannot be verified")
        if not p.exists():
            raise ArtifactError(f"{p}: listed in {folder / MANIFEST} but missing")
        got = sha256_file(p)
        if got != outputs[rel]:
            raise ArtifactError(f"{p}: sha256 {got[:12]}... does not match the manifest's {outputs[rel][:12]}...: the "
                                "file is truncated or altered")
