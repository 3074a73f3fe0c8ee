"""Suite-wide test settings.

Threads: every test runs with torch and faiss on ``THREADS`` threads (the fixture :func:`thread_counts`), the same
number whatever ran before it, and the process's own settings come back at the end. A test that needs another
count sets it and restores it itself; if it does not, the count is put back after it. Test modules never set
thread counts at import (that leaked into every later test: an in-process pipeline run then trained on 1 thread and
the subprocess it was compared with on 2).

Tiny worlds: the builders live in ``worlds.py`` (plain functions that spawned DDP workers can import too; test
modules never import each other); the fixtures below hand out the ones that write files.

Hypothesis runs derandomized by default: its examples follow from the code, so CI and a local run try the same
cases and a red CI run is reproducible. ``CASCADE_HYPOTHESIS=explore python -m pytest -q`` draws fresh random
examples instead (that is how a column whose train values differ by 4e-110 was found to standardise unseen
values to inf); a failure it finds should become an ``@example`` on the test.
"""

import logging
import os

import faiss
import pytest
import torch
from hypothesis import settings

import worlds

PROFILES = {"deterministic": dict(derandomize=True), "explore": dict(derandomize=False)}
for _name, _kw in PROFILES.items():
    settings.register_profile(_name, **_kw)
_profile = os.environ.get("CASCADE_HYPOTHESIS") or "deterministic"
if _profile not in PROFILES:
    raise ValueError(f"CASCADE_HYPOTHESIS={_profile!r} is not one of {sorted(PROFILES)}")
settings.load_profile(_profile)

# autocast "auto" (the default of training and scoring) takes bfloat16 only on a CPU with native bf16 where a probe
# finds it faster: results would depend on the machine. The suite runs as on a CPU without it (float32); set here, so
# subprocesses (CLI runs, DDP workers) inherit it. tests/test_machine.py tests the detection and "auto" itself.
os.environ["CASCADE_NATIVE_BF16"] = "0"
# ... and keeps no probe (cascade.kept_probes): the tests of "auto" probe anew, and nothing lands in the home folder
os.environ["CASCADE_PROBE_CACHE"] = ""

THREADS = 1  # small tensors train faster on one thread, and results do not depend on the machine's core count


def _set_threads(torch_threads: int, faiss_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(autouse=True, scope="session")
def thread_counts():
    """torch / faiss thread counts: THREADS for the whole session (module fixtures included, as they are set up
    after this one), the process's own counts restored at the end; see :func:`_threads_per_test`."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    _set_threads(THREADS, THREADS)
    yield THREADS
    _set_threads(*before)


@pytest.fixture(autouse=True)
def _threads_per_test(thread_counts):
    """Put the counts back to THREADS after a test that changed them (a library call may set faiss threads)."""
    yield
    if (torch.get_num_threads(), faiss.omp_get_max_threads()) != (thread_counts, thread_counts):
        _set_threads(thread_counts, thread_counts)


@pytest.fixture(autouse=True)
def _library_logger_restored():
    """A test that calls the CLI in-process (``cascade.cli.main``) sets handlers on the logger ``cascade``; put its
    handlers, level and propagation back afterwards, so no later test writes to a closed capture stream."""
    lib = logging.getLogger("cascade")
    saved = list(lib.handlers), lib.level, lib.propagate
    yield
    for h in lib.handlers:
        if h not in saved[0]:
            h.close()
    lib.handlers[:] = saved[0]
    lib.setLevel(saved[1])
    lib.propagate = saved[2]


# ---------------------------------------------------------------------------------------------------- tiny worlds


@pytest.fixture
def kuairand_logs(tmp_path):
    """A KuaiRand-Pure folder: the real side tables (linked) and three tiny logs (see worlds.kuairand_dir)."""
    return worlds.kuairand_dir(tmp_path)


@pytest.fixture
def ml1m_dir(tmp_path):
    """A MovieLens-1M folder of five ratings, two users and four movies."""
    d = tmp_path / "ml-1m"
    worlds.write_ml1m(d)
    return d


@pytest.fixture
def custom_example(tmp_path):
    """The files that pipelines/custom.example.toml maps, in tmp_path; the mapping TOML's path."""
    return worlds.write_custom_example(tmp_path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The data step of pipelines/tiny.toml, run once per session: a RunData over a small synthetic world."""
    from pathlib import Path

    from cascade.pipeline import load_config, run_pipeline
    from cascade.run_data import RunData

    runs = tmp_path_factory.mktemp("tiny_data")
    tiny = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
    cfg = load_config(tiny, [f"run.runs_dir={str(runs)!r}"])
    run_pipeline(cfg, until="data", progress=False)
    return RunData(runs / cfg.run.name / "data")
