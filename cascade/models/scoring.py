"""Batched inference of a ranking model over (request, item) pairs and candidate lists.

:func:`score_pairs` scores encoded pair rows in cache-sized forward passes; :func:`ranker_scorer` wraps a model
and a finished run's pair encoder into ``score(requests, candidates [B, N]) -> logits [B, N]``, the scoring
function of the rank stage, the rank log and the teacher's reference lists.
"""

from __future__ import annotations

import numpy as np
import torch

from cascade.data.requests import Requests
from cascade.machine import AutocastChoice, largest_gemm, resolve_autocast

LISTS_MIN = 8  # score_pairs uses forward_lists from this many candidate lists per forward pass on


@torch.inference_mode()
def score_pairs(model: torch.nn.Module, cat: np.ndarray, num: np.ndarray, batch_size: int = 4096,
                list_len: int | None = None, bf16: bool = False) -> np.ndarray:
    """Logits float32 [N] of ``model(cat [N, C], num [N, M])`` (eval mode, inference_mode), in forward passes of
    about ``batch_size`` rows. Small passes are faster on the CPU: with 4,096 rows every activation of the default
    teacher stays in the cache, and scoring ran 2.7x faster than with passes of 65,536 rows (BENCHMARKS.md).

    list_len: the rows are candidate lists of this length (consecutive rows share one request); a Ranker then
    scores them with :meth:`~cascade.models.ranker.Ranker.forward_lists`, which does the user / context work once
    per request, when a pass holds at least ``LISTS_MIN`` lists. Passes hold whole lists. (Side by side on the
    default and the tiny DCN-V2 teachers (low-rank cross): forward_lists takes 0.88-1.05x the time of forward
    from 4 to 40 lists per pass, but 1.08-1.33x at one list, where its fixed cost is not paid back; batch-1
    serving scores one list.)

    bf16: run the forwards under CPU bfloat16 autocast (:func:`scoring_autocast` decides); the logits stay float32.
    """
    out = np.empty(len(cat), np.float32)
    was_training = model.training
    if was_training:  # served models are already in eval mode: a mode switch walks the module tree per call
        model.eval()
    lists = (list_len is not None and hasattr(model, "forward_lists")
             and min(len(cat), batch_size) >= LISTS_MIN * list_len)
    step = max(1, batch_size // list_len) * list_len if lists else batch_size
    try:
        for s in range(0, len(cat), step):
            c, x = torch.from_numpy(cat[s:s + step]), torch.from_numpy(num[s:s + step])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model.forward_lists(c, x, list_len) if lists else model(c, x)
            out[s:s + step] = logits.float().numpy()
    finally:
        if was_training:
            model.train()
    return out


def ranking_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output orders candidates: a model's ``ranking`` (an entire-space ranker's corpus-wide
    score) where it has one, else the model itself (its logits)."""
    return getattr(model, "ranking", model)


def scoring_autocast(model: torch.nn.Module, autocast: str | None = "auto",
                     batch_size: int = 4096) -> AutocastChoice:
    """Whether :func:`score_pairs` runs ``model`` under bfloat16 ("auto" | "bf16" | "off", None: "off";
    :func:`cascade.machine.resolve_autocast` on the model's largest GEMM at ``batch_size`` rows). bf16 scoring
    of a trained ranker keeps >= 0.99 of float32's top-10 (tests/test_machine.py)."""
    return resolve_autocast(autocast, "cpu", largest_gemm(model, batch_size), what="scoring")


def ranker_scorer(model: torch.nn.Module, data, autocast: str | None = "auto"):
    """score(requests, candidates [B, N]) -> ranking scores [B, N] (:func:`ranking_model`) with the pair features
    built on the fly by ``data.pair_features(requests, candidates)`` (a :class:`cascade.run_data.RunData`).

    autocast: bfloat16 scoring, see :func:`scoring_autocast`; what it resolved to is ``score.autocast``. The model is
    put in eval mode here, once: threads that score side by side (:mod:`cascade.threads`) then never switch it."""
    ranking = ranking_model(model)
    ranking.eval()
    choice = scoring_autocast(ranking, autocast)

    def score(requests: Requests, candidates: np.ndarray) -> np.ndarray:
        cat, num = data.pair_features(requests, candidates)
        return score_pairs(ranking, cat, num, list_len=candidates.shape[1], bf16=choice.bf16).reshape(candidates.shape)

    score.autocast = choice
    return score
