"""Retrieval channels: candidate sources beside the distilled two-tower, and their merger.

Every channel answers the stage contract ``select(requests, None, n) -> (item_ids [B, n], scores [B, n])``. The
classic ones (:mod:`.classic`: most-popular in a trailing window, the user's recent items, item-to-item
collaborative filtering, content categories, ALS matrix factorisation, EASE item-item weights) read logged history
strictly before each request, and what they learn comes from the train period only.
:class:`~.merge.MergedRetriever` unites several channels into one retrieval stage, by per-channel quotas or by
their standardised scores, keeping each candidate's channel of origin; :func:`~.merge.quota_cut` keeps those quotas
when the pre-rank stage cuts the union. Each channel alone is also a reference baseline of the replay, as is
:class:`~.popular_ease.PopularEase`, the classic prior most-popular + EASE the teacher's collaborative term chooses.
:func:`~.classic.load_channels` reads back the channels a run's channels step saved (hash-checked), for the replay
and for serving.
"""

from .classic import (
    CHANNELS,
    ALSChannel,
    Channel,
    ContentChannel,
    EaseChannel,
    ItemCFChannel,
    PopularChannel,
    RecentChannel,
    load_channels,
    saved_channel_names,
    why_left_out,
)
from .merge import MERGES, MergedRetriever, origin_shares, quota_cut
from .popular_ease import PopularEase

__all__ = ["CHANNELS", "MERGES", "ALSChannel", "Channel", "ContentChannel", "EaseChannel", "ItemCFChannel",
           "MergedRetriever", "PopularChannel", "PopularEase", "RecentChannel", "load_channels", "origin_shares",
           "quota_cut", "saved_channel_names", "why_left_out"]
