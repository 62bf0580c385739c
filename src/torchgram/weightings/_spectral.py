"""The numerical range of a Gramian: the eigenvalues that ``imtl_g`` and ``aligned_mtl`` invert."""

from __future__ import annotations

import torch
from torch import Tensor


def _kept_eigenvalues(eigenvalues: Tensor) -> Tensor:
    """Which of the ascending eigenvalues ``[m]`` of a Gramian are above its rounding level.

    The level is ``m * eps * λmax``, or the size of the most negative eigenvalue when that is
    larger: a Gramian is positive semi-definite, so a negative eigenvalue is rounding error, and a
    positive one no larger than it cannot be told from rounding either. A zero Gramian keeps none.
    """
    m = eigenvalues.shape[-1]
    eps = torch.finfo(eigenvalues.dtype).eps
    level = torch.maximum(eigenvalues[-1:] * m * eps, -eigenvalues[:1])  # [1], or [0] if m = 0
    return eigenvalues > level
