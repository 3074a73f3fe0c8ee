"""Ground-truth terms: click BCE and the log-Q corrected sampled softmax (retrieval), and the weighted mix."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .common import check_same_shape, masked_mean, very_negative


def click_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits against click labels, mean over ``mask`` (any equal shapes)."""
    check_same_shape("labels", labels, "logits", logits)
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    else:
        check_same_shape("mask", mask, "logits", logits)
    y = labels.to(logits.dtype)
    if bool(((y[mask] < 0) | (y[mask] > 1)).any()):
        raise ValueError("labels must be in [0, 1]")
    # Padded labels may hold anything; zero them so BCE stays finite there.
    y = torch.where(mask, y, torch.zeros_like(y))
    return masked_mean(F.binary_cross_entropy_with_logits(logits, y, reduction="none"), mask)


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    pos_item_emb: torch.Tensor,
    neg_item_emb: torch.Tensor | None = None,
    pos_log_q: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    in_batch: bool = True,
    pos_item_ids: torch.Tensor | None = None,
    neg_item_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax for retrieval towers, with log-Q correction and accidental hits removed.

    Row b's candidates: its positive, the other rows' positives (``in_batch``) and the shared sampled negatives.
    Logit of candidate c: <u_b, v_c> / temperature - log q_c (Yi et al., RecSys 2019: q_c is the probability
    that c is sampled, so popular in-batch items are not over-penalised; applied to every candidate, the positive
    included). A candidate with the same item id as row b's positive (other than the positive itself) is
    removed when ids are given. Mean cross-entropy over rows.

    user_emb: [B, d]; pos_item_emb: [B, d]; neg_item_emb: [N, d] or None; pos_log_q: [B] or None;
    neg_log_q: [N] or None (if any log q is given, every candidate set used must have one);
    pos_item_ids: [B] int or None; neg_item_ids: [N] int or None.
    """
    if user_emb.dim() != 2 or pos_item_emb.shape != user_emb.shape:
        raise ValueError(
            f"user_emb and pos_item_emb must both be [B, d], got {tuple(user_emb.shape)} and "
            f"{tuple(pos_item_emb.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, d = user_emb.shape
    if neg_item_emb is not None and (neg_item_emb.dim() != 2 or neg_item_emb.shape[1] != d):
        raise ValueError(f"neg_item_emb must be [N, {d}], got {tuple(neg_item_emb.shape)}")
    if not in_batch and neg_item_emb is None:
        raise ValueError("sampled_softmax_loss needs negatives: in_batch=True or neg_item_emb")
    use_log_q = pos_log_q is not None or neg_log_q is not None
    if use_log_q:
        if pos_log_q is None:
            raise ValueError("neg_log_q given without pos_log_q: the positives need their log q too")
        if neg_item_emb is not None and neg_log_q is None:
            raise ValueError("pos_log_q given without neg_log_q while neg_item_emb is used")
        if pos_log_q.shape != (B,):
            raise ValueError(f"pos_log_q must be [{B}], got {tuple(pos_log_q.shape)}")
        if neg_item_emb is not None and neg_log_q.shape != (neg_item_emb.shape[0],):
            raise ValueError(f"neg_log_q must be [{neg_item_emb.shape[0]}], got {tuple(neg_log_q.shape)}")
    if pos_item_ids is not None and pos_item_ids.shape != (B,):
        raise ValueError(f"pos_item_ids must be [{B}], got {tuple(pos_item_ids.shape)}")
    if neg_item_ids is not None:
        if neg_item_emb is None or neg_item_ids.shape != (neg_item_emb.shape[0],):
            raise ValueError("neg_item_ids must be [N] and come with neg_item_emb")
        if pos_item_ids is None:
            raise ValueError("neg_item_ids given without pos_item_ids: accidental hits need both")

    blocks, log_q, hit = [], [], []
    if in_batch:
        blocks.append(user_emb @ pos_item_emb.T / temperature)  # [B, B], diagonal = positives
        if use_log_q:
            log_q.append(pos_log_q.detach().to(user_emb.dtype)[None, :].expand(B, B))
        if pos_item_ids is not None:
            same = pos_item_ids[:, None] == pos_item_ids[None, :]
            hit.append(same & ~torch.eye(B, dtype=torch.bool, device=user_emb.device))
        else:
            hit.append(torch.zeros(B, B, dtype=torch.bool, device=user_emb.device))
        target = torch.arange(B, device=user_emb.device)
    else:
        blocks.append((user_emb * pos_item_emb).sum(dim=1, keepdim=True) / temperature)  # [B, 1]
        if use_log_q:
            log_q.append(pos_log_q.detach().to(user_emb.dtype)[:, None])
        hit.append(torch.zeros(B, 1, dtype=torch.bool, device=user_emb.device))
        target = torch.zeros(B, dtype=torch.long, device=user_emb.device)
    if neg_item_emb is not None:
        N = neg_item_emb.shape[0]
        blocks.append(user_emb @ neg_item_emb.T / temperature)  # [B, N]
        if use_log_q:
            log_q.append(neg_log_q.detach().to(user_emb.dtype)[None, :].expand(B, N))
        if neg_item_ids is not None:
            hit.append(pos_item_ids[:, None] == neg_item_ids[None, :])
        else:
            hit.append(torch.zeros(B, N, dtype=torch.bool, device=user_emb.device))
    logits = torch.cat(blocks, dim=1)
    if use_log_q:
        logits = logits - torch.cat(log_q, dim=1)
    # A finite fill keeps the gradient finite; the positive is never a hit, so every row keeps a candidate.
    logits = logits.masked_fill(torch.cat(hit, dim=1), very_negative(logits))
    return F.cross_entropy(logits, target)


def mix(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of scalar loss terms: total = sum_name weights[name] * terms[name].

    Every weight name must name a term and every term must have a weight (0 is allowed), else KeyError naming it;
    a non-finite term raises FloatingPointError naming it. Returns (total, log) where log maps each term name to
    its unweighted float value and "total" to the total's.
    """
    unknown = [name for name in weights if name not in terms]
    if unknown:
        raise KeyError(f"loss weight(s) {unknown} name no loss term; terms are {sorted(terms)}")
    unweighted = [name for name in terms if name not in weights]
    if unweighted:
        raise KeyError(f"loss term(s) {unweighted} have no weight; weights are {sorted(weights)}")
    if not terms:
        raise ValueError("mix needs at least one loss term")
    log: dict[str, float] = {}
    total = None
    for name, term in terms.items():
        if term.dim() != 0:
            raise ValueError(f"loss term {name!r} must be a scalar tensor, got shape {tuple(term.shape)}")
        value = float(term.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss term {name!r} is not finite: {value}")
        log[name] = value
        contribution = term * float(weights[name])
        total = contribution if total is None else total + contribution
    log["total"] = float(total.detach())
    return total, log
