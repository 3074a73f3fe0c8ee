"""RunData: the cross-feature store and the EASE weights are fitted once per process for the same data files."""

import shutil

import numpy as np
import pandas as pd

from cascade import artifacts as A
from cascade.run_data import RunData, drop_ease_fits


def _queries(data: RunData):
    imp = data.impressions.iloc[::97]
    return imp["user_id"].to_numpy(), imp["item_id"].to_numpy(), imp["time_ms"].to_numpy() + 1


def test_steps_reading_one_data_folder_share_one_fitted_store(tiny_data):
    first, again = RunData(tiny_data.dir), RunData(tiny_data.dir)
    assert again.cross is first.cross
    own = RunData(tiny_data.dir, verify=False)  # files not checked against the manifest: fitted anew
    assert own.cross is not first.cross
    got, want = own.cross.query(*_queries(own)), tiny_data.cross.query(*_queries(tiny_data))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


def _flipped_copy(data_dir, tmp_path):
    """A copy of a data folder with every click flipped, its manifest rewritten to match (verifies)."""
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    imp = pd.read_parquet(d / "impressions.parquet")
    imp["click"] = 1 - imp["click"]
    A.write_parquet(d / "impressions.parquet", imp)
    m = A.read_json(d / A.MANIFEST)
    m["outputs"]["impressions.parquet"] = A.sha256_file(d / "impressions.parquet")
    A.write_json(d / A.MANIFEST, m)
    return d


def test_other_files_get_their_own_store(tiny_data, tmp_path):
    """A data folder whose impressions differ (every click flipped, the manifest rewritten to match) is fitted on
    its own files: its click counts are the original's exposures minus its clicks."""
    d = _flipped_copy(tiny_data.dir, tmp_path)
    first, flipped = RunData(tiny_data.dir), RunData(d)
    assert flipped.cross is not first.cross
    got, orig = flipped.cross.query(*_queries(flipped)), tiny_data.cross.query(*_queries(tiny_data))
    assert np.array_equal(got["user_exposures"], orig["user_exposures"]) and orig["user_exposures"].sum() > 0
    assert np.array_equal(got["user_clicks"], orig["user_exposures"] - orig["user_clicks"])
    assert RunData(tiny_data.dir).cross is not first.cross  # one store kept: the last files read


def test_ease_weights_are_fitted_once_per_lambda_for_the_same_files(tiny_data, tmp_path):
    """RunData.ease: the train split's clicks fitted once per lambda for the same verified files, each reader's
    weights read over its own history; unverified files, or other files, are fitted anew (equal weights for equal
    files); each lambda is its own fit; drop_ease_fits forgets all but the lambdas kept."""
    from cascade.channels import EaseChannel

    first, again = RunData(tiny_data.dir), RunData(tiny_data.dir)
    a, b = first.ease(20.0), again.ease(20.0)
    assert b.weights_ is a.weights_ and b.history is again.history and a.history is first.history
    fit_80 = first.ease(80.0)
    assert fit_80.weights_ is not a.weights_ and first.ease(20.0).weights_ is a.weights_
    drop_ease_fits(keep=(20.0,))  # the 80 fit forgotten, the 20 one kept
    assert first.ease(20.0).weights_ is a.weights_ and first.ease(80.0).weights_ is not fit_80.weights_
    own = RunData(tiny_data.dir, verify=False).ease(20.0)
    assert own.weights_ is not a.weights_
    np.testing.assert_array_equal(own.weights_, a.weights_)
    ref = EaseChannel(first.history, 20.0).fit(first.split_history("train"), first.item_ids)
    np.testing.assert_array_equal(ref.weights_, a.weights_)
    assert not np.array_equal(RunData(_flipped_copy(tiny_data.dir, tmp_path)).ease(20.0).weights_, a.weights_)


def test_a_collaborative_term_file_is_read_back_or_refused_naming_it(tmp_path):
    """collaborative.json beside a ranker: saved and read back equal; absent -> None; a damaged or invalid file
    raises naming it; a term needs lam > 0 and a weight > 0 (all weights 0 is no term, not a term)."""
    import pytest

    from cascade.models.collaborative import CollaborativeTerm, load_term

    assert load_term(tmp_path) is None
    term = CollaborativeTerm(200.0, 0.25)
    assert term.save(tmp_path) == "collaborative.json" and load_term(tmp_path) == term
    A.write_json(tmp_path / "collaborative.json", {"lam": 200.0})
    with pytest.raises(ValueError, match=r"collaborative.json: not a collaborative term \('weight'\)"):
        load_term(tmp_path)
    A.write_json(tmp_path / "collaborative.json", {"lam": 200.0, "weight": -1.0})
    with pytest.raises(ValueError, match="collaborative.json: not a collaborative term .*weight=-1.0"):
        load_term(tmp_path)
    for lam, w in ((0.0, 0.5), (200.0, 0.0), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="a collaborative term needs lam > 0, weights >= 0 and one of them > 0"):
            CollaborativeTerm(lam, w)
    # the classic prior's parts: saved and read back; a file from before them reads back with them off (0); a part
    # without its window or lambda, or a negative weight, is refused
    both = CollaborativeTerm(200.0, 0.0, 0.9, 30.0, 3_600_000, 50.0, 0.23)
    both.save(tmp_path)
    assert load_term(tmp_path) == both
    A.write_json(tmp_path / "collaborative.json", {"lam": 200.0, "weight": 0.5})
    assert load_term(tmp_path) == CollaborativeTerm(200.0, 0.5, 0.0, None, 3_600_000, None, 0.0)
    for bad, why in (((200.0, 0.0, 0.5), "needs popular_days > 0"), ((200.0, 0.0, 0.0, None, 1, None, 0.2),
                                                                      "needs popular_lam > 0"),
                     ((200.0, 0.5, -1.0, 7.0), "weights >= 0")):
        with pytest.raises(ValueError, match=why):
            CollaborativeTerm(*bad)
