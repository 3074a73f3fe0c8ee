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


def test_reason_names_the_changed_keys_and_the_changed_inputs(tmp_path, caplog):
    import dataclasses
    import logging

    from cascade.config import config_diff, format_diff, to_dict

    @dataclass(frozen=True)
    class Train:
        epochs: int = 1
        mlp: tuple = (8, 4)

    @dataclass(frozen=True)
    class Two:
        train: Train = Train()
        name: str = "x"

    def make(calls):
        def s1(ctx):
            calls.append("s1")
            A.write_json(ctx.out / "x.json", dataclasses.asdict(ctx.config))
            return StepResult(["x.json"])

        def s2(ctx):
            calls.append("s2")
            A.write_json(ctx.out / "y.json", {})
            return StepResult(["y.json"])

        return [Step("s1", (), lambda c: c, s1), Step("s2", ("s1",), lambda c: 0, s2)]

    calls = []
    run_steps(make(calls), Two(), tmp_path, seed=0, to_plain=to_dict)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cascade.pipeline.runner"):
        run_steps(make(calls), Two(Train(epochs=3, mlp=(8, 2))), tmp_path, seed=0, to_plain=to_dict)
    lines = [r.getMessage() for r in caplog.records if r.name == "cascade.pipeline.runner"]
    assert "[s1] running (config changed: train.epochs: 1 -> 3, train.mlp: [8, 4] -> [8, 2])" in lines
    assert "[s2] running (inputs changed: new outputs of s1)" in lines
    assert sum("[s1]" in line for line in lines) == 2  # one line when it starts, one when it is done
    # a key on one side only, and the cut after `limit` differences
    diff = config_diff({"a": 1, "b": {"c": [1, 2]}}, {"b": {"c": (1, 2), "d": "x"}})
    assert diff == [("a", 1, "(absent)"), ("b.d", "(absent)", "x")]
    assert format_diff(diff, limit=1) == "a: 1 -> (absent), and 1 more"


def test_run_threads_hold_for_every_step(tmp_path, monkeypatch, caplog):
    """run.threads holds for every step of a pipeline: a step (or a library it calls: building a faiss index used
    to do it) that leaves torch on another thread count is named in a warning and set back before the next step."""
    import dataclasses
    import logging
    from pathlib import Path

    import torch

    import cascade.pipeline.run as R
    from cascade.pipeline import load_config, run_pipeline

    data_step, channels_step = R.STEPS[0], R.STEPS[1]
    seen = []

    def data_then_one_thread(ctx):
        result = data_step.run(ctx)
        torch.set_num_threads(1)
        return result

    def channels_counting(ctx):
        seen.append(torch.get_num_threads())
        return channels_step.run(ctx)

    monkeypatch.setattr(R, "STEPS", [dataclasses.replace(data_step, run=data_then_one_thread),
                                     dataclasses.replace(channels_step, run=channels_counting), *R.STEPS[2:]])
    tiny = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
    cfg = load_config(tiny, [f"run.runs_dir={str(tmp_path)!r}", "run.threads=2"])
    with caplog.at_level(logging.WARNING, logger="cascade.pipeline.run"):
        run_pipeline(cfg, until="channels", progress=False)
    assert seen == [2]
    assert "step data left torch on 1 threads: back to run.threads = 2" in caplog.text
