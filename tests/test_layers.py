"""Imports only go down: cli -> pipeline -> train / serve (and run_data) -> models / distill / index / eval -> data
-> the ground floor (config, artifacts, distributed, arrays, threads, machine, run_lock). Checked on the source,
module by module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cascade"

LAYERS = {  # module prefix -> floor (higher floors may import lower ones, never the reverse)
    "cascade.config": 0, "cascade.artifacts": 0, "cascade.distributed": 0, "cascade.arrays": 0,
    "cascade.threads": 0, "cascade.machine": 0, "cascade.run_lock": 0,
    "cascade.data": 1,
    "cascade.models": 2, "cascade.distill": 2, "cascade.index": 2, "cascade.eval": 2, "cascade.channels": 2,
    "cascade.run_data": 3, "cascade.train": 3, "cascade.serve": 3,
    "cascade.pipeline": 4,
    "cascade.cli": 5,
}


def _floor(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cascade")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cascade"):
                out |= {f"{target}.{a.name}" for a in node.names} if node.module is None else {target}
    return out


def test_no_import_runs_up_the_floors():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _floor(module)
        if own is None:  # cascade/__init__.py: the lazy public API
            continue
        for target in _imports(path, module):
            floor = _floor(target)
            if floor is not None and floor > own:
                bad.append(f"{module} (floor {own}) imports {target} (floor {floor})")
    assert not bad, "\n".join(bad)


def test_training_never_imports_serving():
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        module = _module_name(path)
        assert not any(t.startswith("cascade.serve") for t in _imports(path, module)), module
