"""Streaming data layer: a parquet impression dataset larger than RAM -> encoder -> on-disk EncodedTables.

A :class:`StreamDataset` is a folder written by :func:`cascade.data.world.generate_world_stream`: side
tables (read into memory: they grow with users and items only) and impressions as a pyarrow dataset of parquet
files, scanned in record batches. Three streaming passes, each holding one batch at a time:

1. :func:`stream_time_split` reads ``request_id`` and ``time_ms`` and finds the split days exactly as
   :func:`cascade.data.split.time_split` does (a request belongs to the day of its START time; the last
   ``test_days`` days are test, the ``valid_days`` before valid, the rest train), and counts the rows per split.
2. :func:`fit_encoder_stream` fits a :class:`~cascade.data.features.FeatureEncoder` on the train rows in one pass.
   User / item columns: the pass counts each user's and item's train exposures (arrays [U] and [I]); each
   column's statistics are then those of the side-table values weighted by these counts, which is what
   ``FeatureEncoder.fit`` computes from one row per train exposure. Context / privileged columns: the pass merges
   per-batch value counts. Vocabularies (with ``min_count`` and OOV index 0), key kinds, medians, log1p decisions
   and quantile edges equal the in-memory fit exactly; means and standard deviations agree to float rounding
   (a weighted sum instead of numpy's pairwise sum). Memory: the distinct values of each impression column
   (bounded for the integer-valued KuaiRand columns; a float column with a distinct value per row would grow).
3. :func:`encode_stream` encodes batch by batch into ``.npy`` files (``np.lib.format.open_memmap``), one folder per
   split, with exactly the rows, order and values of :func:`cascade.data.features.build_encoded` on the whole
   table (same encoder); :func:`open_encoded` maps them (``mmap_mode='c'``: read-only on disk) as an
   :class:`~cascade.data.batches.EncodedTable` that :func:`cascade.train.loop.fit` trains on without loading it:
   each batch is one ``np.take`` gather from the mapped files (random reads served by the page cache).

Modules: ``dataset`` (the dataset, its scan, pass 1), ``fit`` (pass 2), ``encode`` (pass 3), ``cross`` (the
windowed cross features).

Requests must be contiguous in the dataset (rows sorted by ``request_id``, as the chunked world writes them), so a
request's start time is known when its last row is read; a batch that ends inside a request carries that
request's rows over to the next batch. A decreasing ``request_id`` raises naming the file.

Cross features (optional: ``cross_window_days``). :class:`~cascade.data.features.CrossFeatureStore` answers a
query at time t from the events with ``t - W <= time_ms < t`` only, so the rows whose request starts in a time
chunk [c0, c1) need only the events of [c0 - W, c1). :class:`WindowedCrossFeatures` reads the events (user, item,
time, click) with a second scan that runs just ahead of the rows being encoded, keeps those of the trailing window,
and for each chunk (``chunk_days``, one day by default) fits a ``CrossFeatureStore`` on the events of
[c0 - W, c1) and answers the chunk's rows from it. The counts are those of a store fitted on the whole table
(bit for bit), and events of a row's own request never count (queries use the request START time). Memory: the
events of one window plus one chunk (plus the requests read ahead to finish the chunk, at most one scan batch),
25 bytes each in the buffer, plus the ``CrossFeatureStore`` built on them (four sorted event indexes, more while
it sorts); never the whole log. This relies on request start times being non-decreasing in dataset order
(the chunked world's dense request ids are in start-time order); a dataset that breaks it raises. Each event is
indexed (W + chunk) / chunk times over the pass: a window of 7 days with day chunks fits every event 8 times.
"""

from .cross import WindowedCrossFeatures
from .dataset import StreamDataset, StreamSplit, open_stream_dataset, read_dataset, scan, stream_time_split
from .encode import ENCODED_SPEC, encode_stream, open_encoded
from .fit import fit_encoder_stream

__all__ = ["ENCODED_SPEC", "StreamDataset", "StreamSplit", "WindowedCrossFeatures", "encode_stream",
           "fit_encoder_stream", "open_encoded", "open_stream_dataset", "read_dataset", "scan", "stream_time_split"]
