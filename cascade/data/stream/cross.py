"""Cross features and behaviour sequences of streamed rows from a windowed store refitted per time chunk (bit-equal
to the whole table's)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...arrays import PAD
from ..features import CrossFeatureStore
from ..schema import DataValidationError
from ..split import DAY_MS
from .dataset import StreamDataset, scan


class WindowedCrossFeatures:
    """Cross features (and behaviour sequences) of streamed impression rows, equal to a :class:`CrossFeatureStore`
    fitted on the whole table.

    Call :meth:`query` (or :meth:`query_with_history`, :meth:`history`) with the rows in dataset order (request
    start times non-decreasing from call to call; within a call any order). The events come from a second scan of
    ``sd`` that reads ahead only as far as the queried times need; for each chunk of ``chunk_days`` (chunk k =
    [k, k + 1) * chunk_days since the epoch) a store is fitted on the buffered events of [chunk start - W, chunk
    end), W = ``window_days``. ``max_events_`` is the largest number of events buffered at once (the memory bound,
    for benchmarks).
    """

    feature_names = CrossFeatureStore.feature_names

    def __init__(self, sd: StreamDataset, window_days: float, chunk_days: float = 1.0, tag_column: str = "tag",
                 author_column: str = "author_id", batch_rows: int = 1 << 20):
        if not window_days > 0:
            raise ValueError(f"WindowedCrossFeatures: window_days must be > 0, got {window_days}")
        self.chunk_ms = int(round(chunk_days * DAY_MS))
        if self.chunk_ms < 1:
            raise ValueError(f"WindowedCrossFeatures: chunk_days must be > 0, got {chunk_days}")
        self.sd = sd
        self.window_days, self.chunk_days = window_days, chunk_days
        self.tag_column, self.author_column = tag_column, author_column
        self.window_ms = int(round(window_days * DAY_MS))  # as CrossFeatureStore.query rounds it
        self._items = sd.items[list(dict.fromkeys(["item_id", tag_column, author_column]))]
        self._events = scan(sd, ["user_id", "item_id", "click"], batch_rows)
        # (user, item, time, click, max time) of each buffered scan frame
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = []
        self._read_start = np.iinfo(np.int64).min  # every request starting before this has been read
        self._done = False
        self._chunk: int | None = None
        self._store: CrossFeatureStore | None = None
        self.max_events_ = 0
        self.n_fits_ = 0

    def _read_until(self, t: int, drop_before: int) -> None:
        """Read events until every request starting before ``t`` is buffered; drop frames entirely before
        ``drop_before`` on the way."""
        src = self.sd.source("impressions")
        while not self._done and self._read_start < t:
            df = next(self._events, None)
            if df is None:
                self._done = True
                break
            start = df["request_start_ms"].to_numpy()
            if start[0] < self._read_start or np.any(np.diff(start) < 0):
                raise DataValidationError(f"{src}: request start times must be non-decreasing in dataset order "
                                          "(request ids in start-time order) for streamed cross features")
            self._read_start = int(start[-1])
            # copies: a view would keep the frame's whole int64 block (five columns) alive
            user, item, tm, click = (df[c].to_numpy(dt, copy=True) for c, dt in
                                     (("user_id", np.int64), ("item_id", np.int64), ("time_ms", np.int64),
                                      ("click", np.int8)))
            self._frames.append((user, item, tm, click, int(tm.max())))
            self._frames = [f for f in self._frames if f[4] >= drop_before]

    def _move_to(self, chunk: int) -> None:
        """Fit the store that answers queries of ``chunk`` (on the events of [start - W, end))."""
        lo, hi = chunk * self.chunk_ms - self.window_ms, (chunk + 1) * self.chunk_ms
        self._store = None  # let the previous chunk's index go before the next one is built
        # drop the events before the new window first, so the read-ahead below adds to the window only
        kept = []
        for user, item, tm, click, tmax in self._frames:
            if tmax >= lo:
                k = tm >= lo
                kept.append((user[k], item[k], tm[k], click[k], tmax))
        self._frames = kept
        self._read_until(hi, lo)
        self.max_events_ = max(self.max_events_, sum(len(f[2]) for f in self._frames))
        if len(self._frames) > 1:  # one array per column from here on (a copy of the window, once per chunk)
            self._frames = [(*(np.concatenate([f[k] for f in self._frames]) for k in range(4)),
                             max(f[4] for f in self._frames))]
        user, item, tm, click, _ = self._frames[0] if self._frames else (np.zeros(0, np.int64),) * 4 + (lo,)
        sel = tm < hi  # later events stay buffered for the next chunks
        events = pd.DataFrame({"user_id": user[sel], "item_id": item[sel], "time_ms": tm[sel], "click": click[sel]})
        del user, item, tm, click, sel
        self._store = CrossFeatureStore(self.window_days, tag_column=self.tag_column,
                                        author_column=self.author_column).fit(events, self._items)
        self._chunk = chunk
        self.n_fits_ += 1

    def _by_chunk(self, t_ms: np.ndarray, answer) -> None:
        """Call ``answer(store, rows)`` for the rows of each time chunk of ``t_ms`` (request start times), moving
        the store forward chunk by chunk; ``rows`` is a slice (one chunk) or an index array."""
        chunk = np.floor_divide(t_ms, self.chunk_ms)
        first, last = int(chunk.min()), int(chunk.max())
        if self._chunk is not None and first < self._chunk:
            raise ValueError(f"WindowedCrossFeatures.query: time chunk {first} comes after chunk {self._chunk}; "
                             "rows must be queried in request start order")
        for k in ([first] if first == last else np.unique(chunk).tolist()):
            if k != self._chunk:
                self._move_to(k)
            answer(self._store, slice(None) if first == last else np.flatnonzero(chunk == k))

    def query_with_history(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray,
                           n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Cross features of (user_ids[r], item_ids[r]) at t_ms[r] (request start times): name -> float32 [R], as
        :meth:`CrossFeatureStore.query`, and (n > 0) each row's behaviour sequence int64 [R, n] as
        :meth:`CrossFeatureStore.history` (n = 0: an [R, 0] array). A time in a chunk before the last one queried
        raises."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        if user_ids.shape != item_ids.shape or user_ids.ndim != 1:
            raise ValueError(f"WindowedCrossFeatures.query: user_ids {user_ids.shape} and item_ids {item_ids.shape} "
                             "must be equal 1-d")
        r = len(user_ids)
        out = {name: np.zeros(r, np.float32) for name in self.feature_names}
        hist = np.full((r, n), PAD, np.int64)
        if r == 0:
            return out, hist

        def answer(store: CrossFeatureStore, rows) -> None:
            got = store.query(user_ids[rows], item_ids[rows], t_ms[rows])
            for name in self.feature_names:
                out[name][rows] = got[name]
            if n:
                hist[rows] = store.history(user_ids[rows], t_ms[rows], n)

        self._by_chunk(t_ms, answer)
        return out, hist

    def query(self, user_ids: np.ndarray, item_ids: np.ndarray, t_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Cross features of (user_ids[r], item_ids[r]) at t_ms[r] (request start times): name -> float32 [R],
        as :meth:`CrossFeatureStore.query`. A time in a chunk before the last one queried raises."""
        return self.query_with_history(user_ids, item_ids, t_ms, 0)[0]

    def history(self, user_ids: np.ndarray, t_ms: np.ndarray, n: int) -> np.ndarray:
        """Behaviour sequences int64 [R, n] of (user_ids[r], t_ms[r]), as :meth:`CrossFeatureStore.history`."""
        if n < 1:
            raise ValueError(f"WindowedCrossFeatures.history: n must be >= 1, got {n}")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        t_ms = np.broadcast_to(np.asarray(t_ms, dtype=np.int64), user_ids.shape)
        hist = np.full((len(user_ids), n), PAD, np.int64)
        if len(user_ids):
            def answer(store: CrossFeatureStore, rows) -> None:
                hist[rows] = store.history(user_ids[rows], t_ms[rows], n)

            self._by_chunk(t_ms, answer)
        return hist

    def query_frame(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Cross features of a :func:`scan` frame's rows at their ``request_start_ms``."""
        return self.query(df["user_id"].to_numpy(), df["item_id"].to_numpy(), df["request_start_ms"].to_numpy())
