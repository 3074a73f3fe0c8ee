"""Speed probes kept per machine (cascade.kept_probes) and the autocast choices that read them."""

import json
import logging
import os

import pytest
import torch

from cascade import kept_probes as K
from cascade import machine as M
from cascade.models import scoring as S


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "probes.json"
    monkeypatch.setenv(K.PROBE_CACHE_ENV, str(path))
    return path


def _counting(values):
    """A probe returning ``values`` in turn, and the list of its calls."""
    calls = []

    def measure():
        calls.append(1)
        return values[len(calls) - 1]
    return measure, calls


def test_a_probe_is_measured_once_and_read_back_after(cache):
    measure, calls = _counting([1.32, 1.34, 1.04, 1.04])
    first = K.kept_speedup("machine, 2 threads: GEMM 256x500x128", measure)
    second = K.kept_speedup("machine, 2 threads: GEMM 256x500x128", measure)
    # two readings that agree: their median
    assert first[0] == second[0] == 1.33 and first[1] == second[1] is not None and len(calls) == 2
    kept = json.loads(cache.read_text())
    assert kept["machine, 2 threads: GEMM 256x500x128"]["speedup"] == 1.33
    # another key (another thread count, shape or machine) is measured on its own
    assert K.kept_speedup("machine, 1 thread: GEMM 256x500x128", measure)[0] == 1.04 and len(calls) == 4


def test_nothing_is_kept_where_the_variable_is_empty(monkeypatch, tmp_path):
    monkeypatch.setenv(K.PROBE_CACHE_ENV, "")
    measure, calls = _counting([1.33, 1.33, 1.04, 1.04])
    assert K.kept_speedup("k", measure) == (1.33, None) and K.kept_speedup("k", measure) == (1.04, None)
    assert K.probe_cache_path() is None


def test_the_default_file_is_under_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(K.PROBE_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert K.probe_cache_path() == tmp_path / "cascade" / "probes.json"


def test_the_first_value_written_wins_over_a_probe_that_ran_beside_it(cache):
    """Another process keeps its value while this one measures: both then use the first one written."""
    def measure_while_another_keeps_its_own():
        K.kept_speedup("k", lambda: 1.5)
        return 1.1
    assert K.kept_speedup("k", measure_while_another_keeps_its_own)[0] == 1.5
    assert json.loads(cache.read_text())["k"]["speedup"] == 1.5


@pytest.mark.parametrize("text", ["{not json", '{"k": {"speedup": "fast", "measured": "then"}}', "[1, 2]"])
def test_a_damaged_file_is_an_error_that_names_it(cache, text):
    cache.parent.mkdir(parents=True)
    cache.write_text(text)
    with pytest.raises(ValueError, match="probes.json.*delete the file"):
        K.kept_speedup("k", lambda: 1.0)


def test_auto_keeps_its_choice_where_a_second_probe_would_read_otherwise(cache, monkeypatch):
    """The towers' probe read 1.33x in one run and 1.04x in the next: with the first kept, both runs train in
    bf16; the reason says the value was kept."""
    monkeypatch.setattr(M, "native_bf16", lambda: (True, "mocked"))
    measure, calls = _counting([1.33, 1.33, 1.04, 1.04])
    a = M.resolve_autocast("auto", "cpu", probe=("GEMM 256x500x128", measure))
    b = M.resolve_autocast("auto", "cpu", probe=("GEMM 256x500x128", measure))
    assert a == b and a.dtype == "bf16" and a.speedup == 1.33 and "kept" in a.reason and len(calls) == 2
    with M.torch_threads(2):  # another thread count is another probe
        c = M.resolve_autocast("auto", "cpu", probe=("GEMM 256x500x128", measure))
    assert c.dtype == "float32" and c.speedup == 1.04 and "on 2 threads" in c.reason


def test_the_forward_probe_is_named_by_the_architecture_not_the_weights():
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    with torch.no_grad():
        b.weight.add_(1.0)
    assert S.architecture(a) == S.architecture(b)
    assert S.architecture(a) != S.architecture(torch.nn.Linear(8, 5))
    assert S.architecture(a) != S.architecture(torch.nn.Sequential(torch.nn.Linear(8, 4)))
    assert S.architecture(a).startswith("Linear ")


def test_a_folder_that_cannot_be_written_keeps_nothing_and_says_so(monkeypatch, tmp_path, caplog):
    """A read-only cache folder (a container's home) does not stop a run: the value is this process's own, and a
    warning names the file and the variable."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv(K.PROBE_CACHE_ENV, str(ro / "sub" / "probes.json"))
    if os.access(ro, os.W_OK):  # root ignores the mode bits: make the parent a file instead
        monkeypatch.setenv(K.PROBE_CACHE_ENV, str(tmp_path / "file" / "probes.json"))
        (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="cascade.kept_probes"):
        assert K.kept_speedup("k", lambda: 1.3) == (1.3, None)
    assert "speed probe not kept" in caplog.text and K.PROBE_CACHE_ENV in caplog.text


def test_a_reading_one_burst_of_load_made_is_not_kept(cache, caplog):
    """Two readings that disagree by more than 1.25x are measured again until two in a row agree (at most five),
    and the median is kept: a fluke reading of 56x beside 0.5-0.6x does not steer every later process."""
    measure, calls = _counting([56.0, 0.5, 0.6])
    assert K.kept_speedup("fluke", measure)[0] == 0.6 and len(calls) == 3
    assert json.loads(cache.read_text())["fluke"]["speedup"] == 0.6
    with caplog.at_level(logging.WARNING, logger="cascade.kept_probes"):
        never, calls = _counting([3.0, 1.0, 3.0, 1.0, 3.0])  # they never agree: five readings, the median
        assert K.kept_speedup("noisy", never)[0] == 3.0 and len(calls) == 5
    assert "speed probe readings disagree: [3.0, 1.0, 3.0, 1.0, 3.0]" in caplog.text
