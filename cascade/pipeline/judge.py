"""The validation judge: the requests and clicks on which every weight, window and setting is chosen.

Choices are made on the validation split by outcomes (held-out clicks), never on agreement with the teacher. The
judge is a seeded sample of the validation requests with clicks, the logged traffic as the test replay's headline
measures it. Not the random-exposure slice alone, although its clicks are free of the logging policy's bias: a
randomly shown clicked item is one of the whole corpus, so click-recall@K over the corpus on those requests is
nearly always 0 (on the world 0.002-0.005 at K = 10 for every list, and the same at K = 100 for the
two-tower students that test traffic tells apart at 0.22 vs 0.12): a choice made on it is a coin toss. The slice
stays a report of its own (AUC on the randomly shown items, oracle clicks). Items the user was shown before are
filtered as the replay filters them (:attr:`~cascade.run_data.RunData.seen_filter`: the data step's decision,
:func:`decide_filter_seen`), so a choice is judged on the lists users would get.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..arrays import PAD, pad_by_row
from ..data.history import EventHistory
from ..data.requests import Requests, requests_frame, to_requests
from ..eval.metrics import click_recall
from ..run_data import RunData
from ..serve.cascade import select_unseen

REPEAT_SHARE_FILTER_MAX = 0.02


def decide_filter_seen(setting: bool | str, repeat_click_share: float) -> tuple[bool, str]:
    """(filter seen items or not, why) for a ``data.filter_seen`` setting of true / false / "auto". "auto" filters
    when re-consumption is rare in train (``repeat_click_share``, the share of train clicks on items the user had
    been shown before, below REPEAT_SHARE_FILTER_MAX): a filter then costs at most that share of the clicks and
    frees the slots already-seen items would take."""
    if setting != "auto":
        return bool(setting), f"data.filter_seen = {str(setting).lower()}"
    if not np.isfinite(repeat_click_share):
        return False, "auto: no train clicks to measure re-consumption on: not filtered"
    verdict = repeat_click_share < REPEAT_SHARE_FILTER_MAX
    return verdict, (f"auto: {repeat_click_share:.1%} of train clicks were on items the user had been shown before "
                     f"({'<' if verdict else '>='} {REPEAT_SHARE_FILTER_MAX:.0%}): "
                     f"{'seen items filtered' if verdict else 'not filtered'}")


@dataclass
class Judge:
    """requests: the judged validation requests (R); clicked: int64 [R, C] their clicked items (PAD-padded);
    seen: the shown-items history when seen items are filtered (else None); what: a line saying which requests."""

    requests: Requests
    clicked: np.ndarray
    seen: EventHistory | None
    what: str

    def lists(self, stage, n: int) -> np.ndarray:
        """A retrieval stage's top-n items for the judged requests (seen items filtered as in serving): [R, n]."""
        return select_unseen(stage, self.requests, n, self.seen)[0]

    def recall(self, items: np.ndarray, k: int) -> np.ndarray:
        """Per-request click-recall@k of ``items`` [R, >= k] (float64 [R]; every judged request has a click)."""
        return click_recall(self.clicked, items[:, :k])


def validation_judge(data: RunData, max_requests: int, seed: int) -> Judge:
    """The judge of ``data``'s validation split (see the module docstring); at most ``max_requests`` requests,
    a seeded sample kept in time order."""
    return split_judge(data, "valid", max_requests, seed)


def split_judge(data: RunData, split: str, max_requests: int, seed: int) -> Judge:
    """The requests with clicks of one split and their clicked items, judged as the validation judge is (seen
    items filtered as the run decided); at most ``max_requests`` requests, a seeded sample kept in time order."""
    imp = data.split_impressions(split)
    clicked_any = imp.groupby("request_id").click.max()
    keep = clicked_any.index[clicked_any == 1]
    name = {"valid": "validation"}.get(split, split)
    if len(keep) == 0:
        raise ValueError(f"{data.dir}: the {name} split has no request with a click: nothing to choose on")
    frame = requests_frame(imp[imp.request_id.isin(keep)], data.context_names)
    if len(frame) > max_requests:
        rng = np.random.default_rng(seed)
        frame = frame.iloc[np.sort(rng.choice(len(frame), max_requests, replace=False))].reset_index(drop=True)
    clicks = imp[(imp.click == 1) & imp.request_id.isin(frame.request_id)]
    row = pd.Series(np.arange(len(frame)), index=frame.request_id.to_numpy()).loc[clicks.request_id.to_numpy()]
    clicked = pad_by_row(row.to_numpy(), clicks.item_id.to_numpy(np.int64), len(frame), fill=PAD)
    seen, _ = data.seen_filter
    what = (f"{len(frame):,} {name} requests with clicks (logged traffic; seen items "
            f"{'filtered' if seen is not None else 'kept'})")
    return Judge(to_requests(frame, data.context_names), clicked, seen, what)
