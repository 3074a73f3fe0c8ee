"""RunData: the cross-feature store is fitted once per process for the same data files."""

import shutil

import numpy as np
import pandas as pd

from cascade import artifacts as A
from cascade.run_data import RunData


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


def test_other_files_get_their_own_store(tiny_data, tmp_path):
    """A data folder whose impressions differ (every click flipped, the manifest rewritten to match) is fitted on
    its own files: its click counts are the original's exposures minus its clicks."""
    d = tmp_path / "data"
    shutil.copytree(tiny_data.dir, d)
    imp = pd.read_parquet(d / "impressions.parquet")
    imp["click"] = 1 - imp["click"]
    A.write_parquet(d / "impressions.parquet", imp)
    m = A.read_json(d / A.MANIFEST)
    m["outputs"]["impressions.parquet"] = A.sha256_file(d / "impressions.parquet")
    A.write_json(d / A.MANIFEST, m)
    first, flipped = RunData(tiny_data.dir), RunData(d)
    assert flipped.cross is not first.cross
    got, orig = flipped.cross.query(*_queries(flipped)), tiny_data.cross.query(*_queries(tiny_data))
    assert np.array_equal(got["user_exposures"], orig["user_exposures"]) and orig["user_exposures"].sum() > 0
    assert np.array_equal(got["user_clicks"], orig["user_exposures"] - orig["user_clicks"])
    assert RunData(tiny_data.dir).cross is not first.cross  # one store kept: the last files read
