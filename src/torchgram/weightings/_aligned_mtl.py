"""``aligned_mtl``: align the principal components of the rows before combining them."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._shapes import _uniform, _weighting
from ._spectral import _kept_eigenvalues

_SCALE_MODES = ("min", "median", "rmse")


def _kept_eigenvalue_scale(eigenvalues: Tensor, keep: Tensor, scale_mode: str) -> Tensor:
    """The scale of Aligned-MTL from the eigenvalues above the rank tolerance (ascending order)."""
    count = keep.sum()
    if scale_mode == "min":
        return torch.where(keep, eigenvalues, torch.inf).amin()
    if scale_mode == "rmse":
        return torch.where(keep, eigenvalues, 0.0).sum() / count.clamp(min=1)
    # torch.median's lower median of the kept (largest) eigenvalues, without data-dependent shapes.
    m = eigenvalues.shape[0]
    index = (m - count + (count - 1).clamp(min=0) // 2).clamp(max=m - 1)
    return eigenvalues.gather(0, index.reshape(1)).squeeze(0)


def _balance_matrix(G: Tensor, scale_mode: str) -> Tensor:
    """The balance transformation ``B = sqrt(s) V Σ^{-1/2} Vᵀ`` on the numerical range of G."""
    eigenvalues, V = torch.linalg.eigh(G)
    keep = _kept_eigenvalues(eigenvalues)
    inv_sqrt = torch.where(keep, torch.rsqrt(torch.where(keep, eigenvalues, 1.0)), 0.0)
    scale = _kept_eigenvalue_scale(eigenvalues, keep, scale_mode)
    B = torch.sqrt(scale.clamp(min=0.0)) * (V * inv_sqrt) @ V.mT
    identity = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.where(keep.any(), B, identity)


@_weighting("aligned_mtl(G)", per_row=("pref",))
def aligned_mtl(
    G: Tensor,
    *,
    pref: Tensor | None = None,
    scale_mode: Literal["min", "median", "rmse"] = "min",
) -> Tensor:
    """Weights of Aligned-MTL: ``w = B pref`` with ``B`` the balance transformation.

    Senushkin et al. (2023), Algorithm 1, as in TorchJD: with ``G = V Λ Vᵀ`` restricted to the
    eigenvalues above the rounding level (``λmax * m * eps``, or the size of the most negative
    eigenvalue when larger: see ``imtl_g``), ``B = sqrt(s) V Λ^{-1/2} Vᵀ`` where ``s`` is the
    smallest (``"min"``), the lower median (``"median"``) or the mean (``"rmse"``) of those
    eigenvalues. The rows of ``B J`` are orthogonal with equal norms ``sqrt(s)``.

    Differentiable where the kept eigenvalues are distinct (through ``torch.linalg.eigh``). At a
    rank-deficient ``G`` the weights are not even continuous: a perturbation lifting a zero
    eigenvalue above the rounding level (``G + t q qᵀ``, ``q`` in the null space) adds a direction
    and moves the weights by ``O(1)`` however small ``t``. The gradient there is the derivative
    along the perturbations that keep the rank (those of ``G = J Jᵀ`` through a ``J`` with fewer
    columns than rows), and zero across the null space.

    Degenerate Gramians: a zero ``G`` gives ``w = pref``, and so does ``m = 1``. On a
    rank-deficient or slightly indefinite one only the numerical range is used: a rank-1
    ``G = u uᵀ`` gives ``(uᵀpref / uᵀu) u``.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        pref: Preference vector of shape ``S`` or ``[m]`` (default: uniform ``1/m``).
        scale_mode: Which eigenvalue sets the scale: ``"min"``, ``"median"`` or ``"rmse"``.

    Returns:
        Weights of shape ``S``.

    Raises:
        ValueError: If ``scale_mode`` is not one of the three modes.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import aligned_mtl
        >>> aligned_mtl(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.2500, 0.5000])
    """
    if scale_mode not in _SCALE_MODES:
        raise ValueError(
            f"aligned_mtl(G): expected scale_mode in {_SCALE_MODES}, got {scale_mode!r}. "
            "Use 'min' (the default)."
        )
    u = _uniform(G) if pref is None else pref
    if G.shape[0] == 0:  # no rows: no eigenvalue to scale by
        return u
    return _balance_matrix(G, scale_mode) @ u
