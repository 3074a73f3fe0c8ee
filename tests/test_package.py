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


def test_distribution_name_version_and_runtime_dependencies():
    """The PyPI name is cascade-distill ("cascade" is another project there); `import cascade` stays; scikit-learn
    is a test / benchmark dependency only (no module of the package imports it)."""
    import ast
    import importlib.metadata as md
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == cascade.DISTRIBUTION == "cascade-distill"
    assert md.version("cascade-distill") == project["version"] == cascade.__version__
    assert not any(d.startswith("scikit-learn") for d in project["dependencies"])
    assert any(d.startswith("scikit-learn") for d in project["optional-dependencies"]["dev"])
    runtime = [r for r in md.requires("cascade-distill") if "extra ==" not in r]
    assert runtime and not any(r.startswith("scikit-learn") for r in runtime)
    for path in (root / "cascade").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "sklearn" for n in names), path
