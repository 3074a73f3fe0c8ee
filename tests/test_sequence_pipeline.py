"""End to end with the behaviour-sequence teacher: `cascade run pipelines/tiny.toml --set teacher.sequence_length=N`
builds the sequences in the data step, trains a teacher that reads them, and scores every candidate list with its
request's one sequence; a config that asks for the sequence where it cannot work is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import artifacts as A
from cascade.config import ConfigError
from cascade.data.requests import impression_requests
from cascade.pipeline.config import load_config
from cascade.pipeline.run import run_pipeline
from cascade.run_data import RunData, load_ranker
from cascade.train.loop import evaluate, predict

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
N = 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_seq(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs_seq")
    cfg = load_config(TINY, [f"run.runs_dir={json.dumps(str(runs))}", "run.threads=1", f"teacher.sequence_length={N}"])
    res = run_pipeline(cfg, progress=False)
    return cfg, runs / "tiny", res


def test_the_teacher_reads_the_sequence_the_serving_path_builds(run_seq):
    cfg, run_dir, res = run_seq
    assert all(r["status"] == "ran" for r in res.values())
    assert "history" not in cfg.teacher.model.sides and "history" in cfg.teacher.ranker.sides
    data = RunData(run_dir / "data")
    assert A.read_json(run_dir / "data" / "summary.json")["summary"]["history_attributes"] == \
        ["item_id", "tag", "author_id"]
    test = data.encoded("test")
    hist = test.spec.cat_index("history")
    assert len(hist) == 3 * N
    assert (test.cat[:, hist[0]] > 0).mean() > 0.5  # most test rows have a clicked item in the window
    # the pair features of the rank log, the rank stage and the replay (RunData.pair_features) equal the encoded
    # test rows, history included: one sequence per request, whatever the candidate
    imp = data.split_impressions("test")
    req = impression_requests(imp, data.context_names)
    cat, num = data.pair_features(req, imp["item_id"].to_numpy(np.int64)[:, None])
    np.testing.assert_array_equal(cat, test.cat[:, test.spec.cat_index(*data.spec.cat_sides)])
    np.testing.assert_array_equal(num, test.num[:, test.spec.num_index(*data.spec.num_sides)])
    cands = np.tile(data.item_ids[:7], (len(req), 1))
    lcat, _ = data.pair_features(req, cands)
    lh = lcat[:, data.spec.cat_index("history")].reshape(len(req), 7, -1)
    assert (lh == lh[:, :1]).all() and (lh[:, 0] == cat[:, data.spec.cat_index("history")]).all()


def test_the_saved_teacher_round_trips_and_its_scores_depend_on_the_sequence(run_seq):
    _, run_dir, _ = run_seq
    data = RunData(run_dir / "data")
    test = data.encoded("test")
    teacher = load_ranker(run_dir / "teacher" / "teacher", data.spec)
    # the click model reads the sequence; the exposure model, without the item id by default, goes without it (the
    # item id is the attention's query)
    assert teacher.click.attention is not None and teacher.exposure.attention is None
    assert "history" not in teacher.exposure_cfg.sides and teacher.exposure_cfg.exclude == ("item_id",)
    row = A.read_json(run_dir / "teacher" / "models.json")[0]
    assert row["role"] == "teacher"
    assert evaluate(teacher, test)["auc"] == pytest.approx(row["auc"], abs=1e-9)  # the saved model is the trained one
    # shuffling the sequences among the rows moves the scores of the rows that have one
    hist = test.spec.cat_index("history")
    shuffled = test.take(np.arange(len(test)))
    perm = np.random.default_rng(0).permutation(len(test))
    shuffled.cat[:, hist] = test.cat[perm][:, hist]
    with torch.inference_mode():
        before, after = predict(teacher, test), predict(teacher, shuffled)
    differ = (test.cat[:, hist] != shuffled.cat[:, hist]).any(axis=1)
    assert differ.mean() > 0.5
    assert (np.abs(before - after)[differ] > 1e-6).mean() > 0.9
    np.testing.assert_array_equal(before[~differ], after[~differ])


def test_sequence_configs_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="needs data.cross_features"):
        load_config(TINY, ["teacher.sequence_length=5", "data.cross_features=false"])
    with pytest.raises(ConfigError, match="sequence_length"):
        load_config(TINY, ['teacher.model.sides=["user", "item", "history"]'])
    with pytest.raises(ConfigError, match="teacher.sequence_length = 0"):
        load_config(TINY, ['students.rank_student.sides=["user", "item", "history"]'])
    with pytest.raises(ConfigError, match="sequence_length"):
        load_config(TINY, ["teacher.sequence_length=-1"])
