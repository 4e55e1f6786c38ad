"""Prediction refinement module: a residual MLP on the black box's logits.

``r(l) = l + W2 relu(W1 l + b1) + b2``, trained by gradient (Adam) on logits the
black box returned for augmented views of the training images. It never sees
images or features, only logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._util.threads import threads_for, torch_threads
from .losses import refiner_loss

__all__ = ["ResidualRefiner", "refine_logits"]


class ResidualRefiner(nn.Module):
    """``logits + mlp(logits)`` with ``mlp = Linear(C, hidden) - ReLU - Linear(hidden, C)``.

    Parameters
    ----------
    n_classes : int
    hidden_dim : int
    generator : torch.Generator
        Source of the initial weights.

    Examples
    --------
    >>> import torch
    >>> from skcarrot.refiner import ResidualRefiner
    >>> net = ResidualRefiner(3, 8, torch.Generator().manual_seed(0))
    >>> net(torch.zeros(5, 3)).shape
    torch.Size([5, 3])
    """

    def __init__(self, n_classes: int, hidden_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_classes, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, n_classes)
        with torch.no_grad():  # PyTorch's default init, drawn from our generator
            for layer in (self.fc1, self.fc2):
                bound = 1.0 / np.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        # 4 * hidden operations per logit: one thread even for a generation's 40 x 160 x 10 logits
        with torch_threads(threads_for(4.0 * logits.numel() * self.fc1.out_features)):
            return logits + self.fc2(torch.relu(self.fc1(logits)))

    def get_weights(self) -> dict[str, np.ndarray]:
        """Weights as float32 NumPy arrays (what a fitted estimator stores)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load weights from :meth:`get_weights`."""
        self.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})

    def train_epoch(
        self,
        optimizer: torch.optim.Optimizer,
        logits: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        weight: float,
        rng: np.random.RandomState,
    ) -> float:
        """One pass over ``logits`` in shuffled mini-batches; returns the mean loss.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            Over this module's parameters.
        logits : ndarray of shape (n_samples, n_classes)
            The black box's logits for this epoch's views.
        y : ndarray of shape (n_samples,)
            Class indices.
        batch_size : int
        weight : float
            Consistency weight of :func:`skcarrot.losses.refiner_loss` (0: CE only).
        rng : numpy.random.RandomState
            Shuffles the samples.
        """
        with torch_threads(1):  # a few thousand multiply-adds per step: one thread is fastest
            return self._train_epoch(optimizer, logits, y, batch_size, weight, rng)

    def _train_epoch(self, optimizer, logits, y, batch_size, weight, rng) -> float:
        self.train()
        L = torch.as_tensor(logits, dtype=torch.float32)
        Y = torch.as_tensor(y, dtype=torch.long)
        order = rng.permutation(len(L))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = torch.as_tensor(order[start : start + batch_size])
            batch = L[idx]
            loss = refiner_loss(batch, self(batch), Y[idx], weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        self.eval()
        return total / len(order)


def refine_logits(logits: np.ndarray, weights: dict[str, np.ndarray] | None) -> np.ndarray:
    """Apply a fitted refiner with NumPy only (no torch needed at prediction).

    Parameters
    ----------
    logits : ndarray of shape (..., n_classes)
    weights : dict from :meth:`ResidualRefiner.get_weights`, or None for identity.

    Returns
    -------
    refined : ndarray, float64, same shape as ``logits``

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.refiner import refine_logits
    >>> refine_logits(np.ones((2, 3)), None)
    array([[1., 1., 1.],
           [1., 1., 1.]])
    """
    logits = np.asarray(logits, dtype=np.float64)
    if weights is None:
        return logits
    w1 = np.asarray(weights["fc1.weight"], dtype=np.float64)
    b1 = np.asarray(weights["fc1.bias"], dtype=np.float64)
    w2 = np.asarray(weights["fc2.weight"], dtype=np.float64)
    b2 = np.asarray(weights["fc2.bias"], dtype=np.float64)
    hidden = np.maximum(logits @ w1.T + b1, 0.0)
    return logits + hidden @ w2.T + b2
