"""``krum``: Byzantine-robust selection of the rows closest to their neighbours."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _check_positive_int, _weighting


def _pairwise_distances(G: Tensor) -> Tensor:
    """Euclidean distances between the rows of J, from their Gramian ``G`` [m, m]."""
    norms = torch.diagonal(G)
    return torch.sqrt((norms.unsqueeze(0) + norms.unsqueeze(1) - 2 * G).clamp(min=0.0))


@_weighting("krum(G)")
def krum(G: Tensor, *, n_byzantine: int, n_selected: int = 1) -> Tensor:
    """Weights of (Multi-)Krum: average the ``n_selected`` rows with the smallest Krum score.

    Blanchard et al. (2017). The score of a row is the sum of its distances to its
    ``m - n_byzantine - 2`` nearest other rows. Ties are broken by ``torch.topk``.

    Not differentiable (a selection).

    Degenerate Gramians: ``m`` below ``n_byzantine + 3`` (e.g. ``m = 1``) raises the error below.
    A zero ``G`` gives equal scores: ``torch.topk`` breaks the tie (which rows it selects is not
    specified). Distances are clamped at zero, so a slightly indefinite ``G`` gives finite
    weights.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``, with
            ``m >= n_byzantine + 3`` and ``m >= n_selected``.
        n_byzantine: Number of rows that may be adversarial.
        n_selected: Number of rows to average.

    Returns:
        Weights of shape ``S``: ``1 / n_selected`` on the selected rows, 0 elsewhere.

    Raises:
        ValueError: If ``m`` is too small for ``n_byzantine`` or ``n_selected``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import krum
        >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-9.0, 5.0]])
        >>> krum(J @ J.T, n_byzantine=1)
        tensor([0., 1., 0., 0.])
    """
    call = "krum(G)"
    _check_positive_int(n_byzantine, call, "n_byzantine", minimum=0)
    _check_positive_int(n_selected, call, "n_selected")
    m = G.shape[0]
    if m < n_byzantine + 3 or m < n_selected:
        raise ValueError(
            f"{call}: expected at least max(n_byzantine + 3, n_selected) = "
            f"{max(n_byzantine + 3, n_selected)} rows, got m={m}. Lower n_byzantine or n_selected."
        )
    nearest, _ = torch.topk(_pairwise_distances(G), k=m - n_byzantine - 1, largest=False)
    scores = nearest[:, 1:].sum(dim=1)
    _, selected = torch.topk(scores, k=n_selected, largest=False)
    one_hot = torch.nn.functional.one_hot(selected, num_classes=m).sum(dim=0)
    return one_hot.to(G.dtype) / n_selected
