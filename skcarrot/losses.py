"""Cross-entropy fitness and the prediction-consistency KL.

Both work on batches of prompts: logits of shape ``(..., n_images, n_classes)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._util.threads import threads_for, torch_threads

__all__ = ["cross_entropy", "consistency_kl", "prompt_fitness", "refiner_loss"]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over images, one value per leading batch entry.

    Parameters
    ----------
    logits : Tensor of shape (..., n_images, n_classes)
    y : Tensor of shape (n_images,)
        Class indices.

    Returns
    -------
    loss : Tensor of shape (...)

    Examples
    --------
    >>> import torch
    >>> from skcarrot.losses import cross_entropy
    >>> round(float(cross_entropy(torch.zeros(1, 2), torch.tensor([0]))), 4)
    0.6931
    """
    return _mean_nll(F.log_softmax(logits, dim=-1), y)


def _mean_nll(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    picked = logp.gather(-1, y.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return -picked.mean(dim=-1)


def consistency_kl(target_logits: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(input))`` averaged over images.

    Parameters
    ----------
    target_logits, input_logits : Tensor of shape (..., n_images, n_classes)

    Returns
    -------
    kl : Tensor of shape (...)

    Examples
    --------
    >>> import torch
    >>> from skcarrot.losses import consistency_kl
    >>> float(consistency_kl(torch.zeros(3, 4), torch.zeros(3, 4)))
    0.0
    """
    return _kl(F.log_softmax(target_logits, dim=-1), F.log_softmax(input_logits, dim=-1))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=-1)


def prompt_fitness(
    logits: torch.Tensor, refined: torch.Tensor | None, y: torch.Tensor, weight: float
) -> torch.Tensor:
    """Fitness of candidate prompts (lower is better), the refiner frozen.

    ``CE(l_z, y) + weight * KL(softmax(l_z + r(l_z)) || softmax(l_z))``; without
    a refiner (``refined`` is None) only the cross-entropy.

    Parameters
    ----------
    logits : Tensor of shape (P, n_images, n_classes)
        The black box's logits ``l_z`` for each candidate.
    refined : Tensor of the same shape or None
        ``l_z + r(l_z)``.
    y : Tensor of shape (n_images,)
    weight : float

    Returns
    -------
    fitness : Tensor of shape (P,)

    Examples
    --------
    >>> import torch
    >>> from skcarrot.losses import prompt_fitness
    >>> prompt_fitness(torch.zeros(2, 3, 4), None, torch.tensor([0, 1, 2]), 0.1).shape
    torch.Size([2])
    """
    with torch_threads(threads_for(30.0 * logits.numel())):  # a few dozen operations per logit
        log_q = F.log_softmax(logits, dim=-1)
        loss = _mean_nll(log_q, y)  # cross_entropy(logits, y)
        if refined is not None and weight:
            log_p = F.log_softmax(refined, dim=-1)
            loss = loss + weight * _kl(log_p, log_q)  # consistency_kl(refined, logits), log_q computed once
    return loss


def refiner_loss(
    logits: torch.Tensor, refined: torch.Tensor, y: torch.Tensor, weight: float
) -> torch.Tensor:
    """Loss of the refiner: ``CE(l + r(l), y) + weight * KL(softmax(l) || softmax(l + r(l)))``.

    Parameters
    ----------
    logits : Tensor of shape (n_images, n_classes)
        The black box's logits ``l``.
    refined : Tensor of shape (n_images, n_classes)
        ``l + r(l)``.
    y : Tensor of shape (n_images,)
    weight : float
        Consistency weight; 0 gives plain cross-entropy.

    Returns
    -------
    loss : Tensor (scalar)

    Examples
    --------
    >>> import torch
    >>> from skcarrot.losses import refiner_loss
    >>> l = torch.zeros(2, 3)
    >>> round(float(refiner_loss(l, l, torch.tensor([0, 1]), 0.1)), 4)
    1.0986
    """
    loss = cross_entropy(refined, y)
    if weight:
        loss = loss + weight * consistency_kl(logits, refined)
    return loss
