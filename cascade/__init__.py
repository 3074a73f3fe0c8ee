"""cascade: a distilled cascade recommender (retrieval -> pre-rank -> rank), one ranking teacher distilled into
every stage, measured stage by stage.

The small public API (``from cascade import ...``); each name is imported on first use, so ``import cascade``
stays cheap (no torch / faiss until a name needs them):

- :func:`load_config`, :func:`run_pipeline`, :class:`PipelineConfig`: the offline pipeline (``cascade.pipeline``);
- :class:`RunData`: a finished run read back (``cascade.run_data``);
- :func:`load_cascade`, :class:`Cascade`: the servable cascade of a finished run (``cascade.serve.cascade``);
- :class:`Requests`, :func:`requests_frame`, :func:`to_requests`: what the cascade serves (``cascade.data.requests``);
- :class:`WorldConfig`, :func:`generate_world`: the synthetic world (``cascade.data.world``).

Where things live: README.md, "Where things live".
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

DISTRIBUTION = "cascade-distill"  # the name on PyPI ("cascade" there is another project); the import name is cascade

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # a source tree used without installing it (pip install -e . records the version)
    __version__ = "0+unknown"

_API = {
    "load_config": "cascade.pipeline", "run_pipeline": "cascade.pipeline", "PipelineConfig": "cascade.pipeline",
    "RunData": "cascade.run_data", "load_cascade": "cascade.serve.cascade", "Cascade": "cascade.serve.cascade",
    "Requests": "cascade.data.requests", "requests_frame": "cascade.data.requests",
    "to_requests": "cascade.data.requests",
    "WorldConfig": "cascade.data.world", "generate_world": "cascade.data.world",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # the next access skips this function
        return value
    raise AttributeError(f"module 'cascade' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
