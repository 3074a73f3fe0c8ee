"""Distillation and ground-truth losses, as pure functions of tensors.

Every loss returns a scalar tensor. List losses take padded lists: ``student`` scores ``[B, L]``, the teacher's
``teacher_rank`` (int, 1 = the teacher's best item of the row) and/or ``teacher_logits`` ``[B, L]``, and a ``mask``
bool ``[B, L]`` with True for a real entry. Padding never reaches a loss value or a gradient: a fully-masked row
contributes nothing, and a batch with no usable entry gives an exact 0 that still carries a (zero) gradient.
Everything the teacher provides is treated as a constant (detached here), so a distillation term never sends
gradient into the teacher.

Sources: Ranking Distillation (Tang & Wang, KDD 2018) for the top-K weighted pointwise loss; BPR for pairs;
LambdaLoss (Wang et al., CIKM 2018) with the NDCG-Loss2 weights and ApproxNDCG (Qin et al., 2010) for lists;
Hinton et al. 2015 for soft targets; Confidence Ranking (JD, 2023) for CR / RCR; Yi et al. (RecSys 2019) for the
log-Q corrected in-batch sampled softmax.

Modules: ``lists`` (rank-list distillation), ``logits`` (logit KD, hint, CR / RCR), ``truth`` (click BCE, sampled
softmax, :func:`mix`), ``common`` (shared checks and helpers).
"""

from .lists import (
    approx_ndcg_loss,
    bpr_pairwise_loss,
    graded_relevance,
    lambda_ndcg_loss,
    listnet_kl_loss,
    pointwise_topk_loss,
)
from .logits import confidence_ranking_loss, hint_loss, hinton_kd_loss, logit_mse, relative_confidence_ranking_loss
from .truth import click_bce, mix, sampled_softmax_loss

__all__ = [
    "pointwise_topk_loss",
    "bpr_pairwise_loss",
    "graded_relevance",
    "lambda_ndcg_loss",
    "approx_ndcg_loss",
    "listnet_kl_loss",
    "logit_mse",
    "hinton_kd_loss",
    "confidence_ranking_loss",
    "relative_confidence_ranking_loss",
    "hint_loss",
    "click_bce",
    "sampled_softmax_loss",
    "mix",
]
