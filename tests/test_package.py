"""The package's public face: version, the small public API, py.typed, a cheap `import cascade`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cascade


def test_version_and_public_api():
    assert cascade.__version__ and cascade.__version__ != "0+unknown"  # installed (pip install -e .)
    for name in cascade.__all__:
        assert getattr(cascade, name) is not None, name
    from cascade.pipeline import load_config

    assert cascade.load_config is load_config


def test_py_typed_is_shipped_and_import_is_cheap():
    assert (Path(cascade.__file__).parent / "py.typed").is_file()
    code = "import sys, cascade; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # the API names load their modules on first use
