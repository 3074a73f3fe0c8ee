"""The step runner: skip when unchanged, re-run exactly the dependants of a change, survive a kill."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from cascade import artifacts as A
from cascade.pipeline.runner import Step, StepResult, run_steps


@dataclass(frozen=True)
class Cfg:
    a: int = 1
    b: int = 2


def make_steps(calls, crash_in=None):
    def s1(ctx):
        calls.append("s1")
        A.write_json(ctx.out / "x.json", {"v": ctx.config * 10})
        return StepResult(["x.json"], {"v": ctx.config * 10})

    def s2(ctx):
        calls.append("s2")
        x = A.read_json(ctx.inputs["s1"] / "x.json")["v"]
        A.write_json(ctx.out / "y.json", {"v": x + ctx.config})
        if crash_in == "s2":
            raise KeyboardInterrupt("killed")
        return StepResult(["y.json"], {"v": x + ctx.config})

    return [Step("s1", (), lambda c: c.a, s1), Step("s2", ("s1",), lambda c: c.b, s2)]


def test_skip_rerun_and_dependants(tmp_path):
    calls = []
    r = run_steps(make_steps(calls), Cfg(), tmp_path, seed=0)
    assert calls == ["s1", "s2"] and r["s2"]["manifest"]["metrics"]["v"] == 12
    calls.clear()
    r = run_steps(make_steps(calls), Cfg(), tmp_path, seed=0)
    assert calls == [] and {v["status"] for v in r.values()} == {"skipped"}
    # Changing b re-runs only s2; changing a re-runs both.
    run_steps(make_steps(calls), Cfg(b=5), tmp_path, seed=0)
    assert calls == ["s2"]
    calls.clear()
    r = run_steps(make_steps(calls), Cfg(a=2, b=5), tmp_path, seed=0)
    assert calls == ["s1", "s2"] and r["s2"]["manifest"]["metrics"]["v"] == 25
    calls.clear()
    run_steps(make_steps(calls), Cfg(a=2, b=5), tmp_path, seed=0, force=("s2",))
    assert calls == ["s2"]
    with pytest.raises(ValueError, match="no such step"):
        run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, force=("nope",))


def test_altered_artifact_is_recomputed(tmp_path):
    calls = []
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0)
    (tmp_path / "s1" / "x.json").write_text(json.dumps({"v": 999}))
    calls.clear()
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0)
    assert calls == ["s1"]  # s1's outputs are identical after the redo, so s2 stays valid
    assert A.read_json(tmp_path / "s1" / "x.json") == {"v": 10}


def test_crash_leaves_previous_result_and_no_half_step(tmp_path):
    calls = []
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0)
    with pytest.raises(KeyboardInterrupt):
        run_steps(make_steps(calls, crash_in="s2"), Cfg(b=7), tmp_path, seed=0)
    # The old s2 is untouched (still the b=2 result) and its manifest still verifies.
    assert A.read_json(tmp_path / "s2" / "y.json") == {"v": 12}
    calls.clear()
    r = run_steps(make_steps(calls), Cfg(b=7), tmp_path, seed=0)
    assert calls == ["s2"] and r["s2"]["manifest"]["metrics"]["v"] == 17
    assert not (tmp_path / ".s2.partial").exists()


def test_code_change_reruns(tmp_path):
    calls = []
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, code_hash="v1")
    calls.clear()
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, code_hash="v1")
    assert calls == []
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, code_hash="v2")
    assert calls == ["s1", "s2"]  # every step written by other code is redone


def test_reuse_takes_finished_steps_as_they_are(tmp_path):
    calls = []
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, code_hash="v1")
    calls.clear()
    # `cascade report RUN` after a code change: the finished upstream step is reused, the asked one redone
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, code_hash="v2", reuse=("s1",), force=("s2",))
    assert calls == ["s2"]
    (tmp_path / "s1" / "x.json").write_text("{}")  # an altered artifact is never reused
    calls.clear()
    run_steps(make_steps(calls), Cfg(), tmp_path, seed=0, code_hash="v2", reuse=("s1",))
    assert calls == ["s1"]  # redone identically, so s2 (already written by v2 code) stays valid
