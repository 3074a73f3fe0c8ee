"""Batched inference of a ranking model over (request, item) pairs and candidate lists.

:func:`score_pairs` scores encoded pair rows in cache-sized forward passes; :func:`ranker_scorer` wraps a model
and a finished run's pair encoder into ``score(requests, candidates [B, N]) -> logits [B, N]``, the scoring
function of the rank stage, the rank log and the teacher's reference lists.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import numpy as np
import torch

from cascade.data.requests import Requests
from cascade.machine import AutocastChoice, best_seconds_alternating, check_autocast, resolve_autocast
from cascade.models.collaborative import term_of

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
    lists, step = passes(model, len(cat), batch_size, list_len)
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


def passes(model: torch.nn.Module, n_rows: int, batch_size: int, list_len: int | None) -> tuple[bool, int]:
    """How :func:`score_pairs` splits ``n_rows`` rows: (whether it scores lists with ``forward_lists``, the rows
    of a pass)."""
    lists = (list_len is not None and hasattr(model, "forward_lists")
             and min(n_rows, batch_size) >= LISTS_MIN * list_len)
    return lists, max(1, batch_size // list_len) * list_len if lists else batch_size


def ranking_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output orders candidates: a model's ``ranking`` (an entire-space ranker's corpus-wide
    score) where it has one, else the model itself (its logits)."""
    return getattr(model, "ranking", model)


def forward_bf16_speedup(model: torch.nn.Module, cat: np.ndarray, num: np.ndarray, list_len: int | None = None,
                         repeats: int = 5) -> float:
    """float32 time / bfloat16-autocast time of ``score_pairs(model, cat, num, list_len=list_len)`` on these rows
    (one forward pass: give at most a pass's rows), best of ``repeats`` rounds that time the two in turn
    (:func:`cascade.machine.best_seconds_alternating`). Unlike a GEMM alone, this counts everything the forward
    casts and runs: at 100 rows (one list at batch-1 serving) the default teacher's forward took 1.15x float32's
    time under bf16 autocast, although its largest GEMM alone ran 1.3x faster (BENCHMARKS.md)."""
    f32, bf16 = best_seconds_alternating(
        [lambda b=b: score_pairs(model, cat, num, len(cat), list_len, bf16=b) for b in (False, True)], repeats)
    return f32 / bf16


def architecture(model: torch.nn.Module) -> str:
    """The model's class and a digest of its parameters' and buffers' names, shapes and dtypes: what its forward's
    speed depends on (not the values), so a kept probe of one architecture is never read for another. An
    entire-space ranker's ranking score (a view, not a module) is named by its ranker and whether it runs the
    exposure model."""
    if not isinstance(model, torch.nn.Module):
        parent = model.parent
        return f"{type(model).__name__} of {architecture(parent)}" + ("" if parent.uses_exposure else ", click only")
    shapes = [(n, tuple(t.shape), str(t.dtype)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    return f"{type(model).__name__} {hashlib.sha256(repr(shapes).encode()).hexdigest()[:12]}"


def scoring_autocast(model: torch.nn.Module, autocast: str | None, cat: np.ndarray, num: np.ndarray,
                     list_len: int | None = None) -> AutocastChoice:
    """Whether :func:`score_pairs` runs ``model`` under bfloat16 on passes like ``(cat [R, C], num [R, M])``
    ("auto" | "bf16" | "off", None: "off"; :func:`cascade.machine.resolve_autocast`): "auto" probes the model's
    own forward on these rows (:func:`forward_bf16_speedup`). bf16 scoring of a trained ranker keeps >= 0.99 of
    float32's top-10 (tests/test_machine.py)."""
    probe = (f"{architecture(model)} forward of {len(cat)} rows" + (f" (lists of {list_len})" if list_len else ""),
             lambda: forward_bf16_speedup(model, cat, num, list_len))
    return resolve_autocast(autocast, "cpu", what="scoring", probe=probe)


#: model -> requested autocast -> (pass size class, list length, threads) -> choice: every scorer of one model in a
#: process scores a pass size in one dtype (two cascades of a replay that share their ranker are compared on equal
#: terms, whatever a second probe would have read)
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHOICES_LOCK = threading.Lock()


def ranker_scorer(model: torch.nn.Module, data, autocast: str | None = "auto", batch_size: int = 4096):
    """score(requests, candidates [B, N]) -> ranking scores [B, N] (:func:`ranking_model`) with the pair features
    built on the fly by ``data.pair_features(requests, candidates)`` (a :class:`cascade.run_data.RunData`), in
    forward passes of about ``batch_size`` rows (:func:`score_pairs`), plus the model's collaborative term where it
    carries one (:mod:`cascade.models.collaborative`; its EASE weights from ``data.ease``, its click counts from
    ``data.popular_channel``).

    autocast: bfloat16 scoring, decided per size of pass: whether bf16 pays depends on it (one list of 100
    candidates at batch-1 serving vs the rank log's passes of 4,096 rows), so "auto" probes the forward
    (:func:`scoring_autocast`) on the first call whose passes fall in each power-of-two size class (per list
    length and torch thread count; once per model in a process, for every scorer of it) and every pass of a call
    runs in that one dtype. ``score.autocast`` maps (pass rows' size class, list length, threads) -> the
    :class:`~cascade.machine.AutocastChoice` made so far (:func:`autocast_record` writes a model's choices for a
    manifest); ``score.decide(requests, candidates)`` makes the choice of such calls ahead of them (a step that
    times its scoring probes first). The model is put in eval mode here, once: threads that score side by side
    (:mod:`cascade.threads`) then never switch it; the choices are made under a lock."""
    ranking = ranking_model(model)
    ranking.eval()
    mode = check_autocast(autocast, "scoring")  # a bad value raises here, before any scoring
    with _CHOICES_LOCK:  # keyed by the model: an entire-space ranker's ranking score is a new view per access
        choices = _CHOICES.setdefault(model, {}).setdefault(mode, {})

    def choice_for(cat: np.ndarray, num: np.ndarray, list_len: int) -> AutocastChoice:
        if len(cat) == 0:  # nothing to score, nothing to probe
            return AutocastChoice(mode, "float32", "no rows")
        rows = min(len(cat), passes(ranking, len(cat), batch_size, list_len)[1])
        size = min(1 << max(rows - 1, 0).bit_length(), batch_size)  # its power-of-two class
        key = (size, list_len, torch.get_num_threads())
        with _CHOICES_LOCK:
            if key not in choices:
                choices[key] = scoring_autocast(ranking, mode, cat[:rows], num[:rows], list_len)
            return choices[key]

    term = term_of(model)
    ease = None if term is None or term.weight == 0 else data.ease(term.lam)
    popular = (None if term is None or term.popular_weight == 0 else
               data.popular_channel(term.popular_days, term.refresh_ms))
    popular_ease = None if term is None or term.popular_ease_weight == 0 else data.ease(term.popular_lam)

    def score(requests: Requests, candidates: np.ndarray) -> np.ndarray:
        cat, num = data.pair_features(requests, candidates)
        n = candidates.shape[1]
        s = score_pairs(ranking, cat, num, batch_size, list_len=n,
                        bf16=choice_for(cat, num, n).bf16).reshape(candidates.shape)
        if ease is not None:
            s += np.float32(term.weight) * ease.standardised(requests, candidates)
        if popular is not None:
            s += np.float32(term.popular_weight) * popular.standardised(requests, candidates, len(data.item_ids))
        if popular_ease is not None:
            s += np.float32(term.popular_ease_weight) * popular_ease.standardised(requests, candidates)
        return s

    def decide(requests: Requests, candidates: np.ndarray) -> AutocastChoice:
        """Make (probe) the choice of calls like score(requests, candidates) now, without scoring them."""
        return choice_for(*data.pair_features(requests, candidates), candidates.shape[1])

    score.autocast = choices
    score.decide = decide
    return score


def autocast_record(model: torch.nn.Module) -> dict[str, dict[str, dict]]:
    """The bfloat16 choices the scorers of ``model`` made in this process, for a manifest: requested autocast ->
    "<rows> rows, lists of <N>, <t> threads" -> the choice's fields (requested, dtype, reason, speedup)."""
    with _CHOICES_LOCK:
        made = {k: dict(v) for k, v in _CHOICES.get(model, {}).items()}
    return {mode: {f"{r} rows, lists of {n}, {t} threads": c.to_dict() for (r, n, t), c in sorted(choices.items())}
            for mode, choices in made.items() if choices}
