"""What a run of fn under the tape leaves behind (``Linearised``), and a transform's options.

A run (see ``torchgram._run``) gives fn's output, every use of a parameter with its inputs
(the records) and the cotangents of its taps. The rules turn those into factors, once, from which
``Linearised.gramian`` assembles the Gramian and ``Linearised.vjp`` the weighted
gradients, without running fn again.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from torchgram._assemble import gramian_of_factors, weighted_gradients
from torchgram._factors import DEFAULT_CHUNK_BYTES, Dense, Factor, Kept
from torchgram._ops import use_factors
from torchgram._ops.generic import NoGenericRule
from torchgram._shapes import generalize
from torchgram._uses import Use

Tensor = torch.Tensor


@dataclass
class Linearised:
    """What one run leaves behind: the output, and every use with its inputs and cotangents.

    Attributes:
        out: fn's output ``S``.
        aux: fn's auxiliary output (None without has_aux).
        uses: The recorded uses.
        records: The data inputs of the uses, each ``[B, ...]``.
        cotangents: For each tap (a use's output, or its parameter arguments), ``[K, B, ...]``.
        params: The flattened parameter leaves.
        batch_dim: Where the samples lie in ``out``, or None (then ``B = 1``).
        chunk_bytes: Largest intermediate the rules may build at once (see ``Options``).
        random: Whether fn drew random numbers in the run.
        statistics: Running statistics the run updated, with their values before it (to put
            back if the call then fails).
        caller: How to name the public call in error messages.
        gradients: Each leaf's gradients ``[K, *leaf.shape]`` of the K rows, where the run
            pulled the rows back to the parameters instead of the taps (then the records and
            cotangents are empty, and these are the factors), else None.
        kept: Per-sample gradients the last ``gramian`` kept for ``vjp``, by leaf.
    """

    out: Tensor
    aux: Any
    uses: list[Use]
    records: list[Tensor]
    cotangents: list[Tensor]
    params: tuple[Tensor, ...]
    batch_dim: int | None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    random: bool = False
    statistics: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)
    caller: str = "gramian"
    gradients: list[Tensor] | None = None
    kept: dict[int, list[Kept]] | None = None

    @functools.cached_property
    def contributions(self) -> list[tuple[int, Factor]]:
        """``(leaf, factor)`` for every parameter argument of every use (computed once)."""
        if self.gradients is not None:
            return [(leaf, Dense(None, g.unsqueeze(1))) for leaf, g in enumerate(self.gradients)]
        contributions = []
        for use in self.uses:
            cotangents = self.cotangents[use.first_tap : use.first_tap + len(use.tapped)]
            try:
                contributions.extend(use_factors(use, self.records, cotangents))
            except NoGenericRule as missing:
                raise missing.error(self.caller) from None
        return contributions

    def forget_factors(self) -> None:
        """Drop the factors made so far (made without grad for a comparison: made again for a
        Gramian that may need a graph)."""
        self.__dict__.pop("contributions", None)
        self.kept = None

    def gramian(self, release: bool = False) -> Tensor:
        """The generalized Gramian ``S + S[::-1]``.

        ``release``: let go of the factors, and of the records and cotangents they hold, leaf by
        leaf as the Gramian is assembled, so that memory falls instead of rising; ``vjp``
        cannot be called after. Otherwise, the per-sample gradients the Gramian builds are kept
        where reusing them saves the direction's work (up to ``chunk_bytes`` in all; see
        ``torchgram._assemble._reused``), for ``vjp``.
        """
        if not self.out.numel():  # no rows (an empty batch): nothing to pull back or assemble
            shape = (*self.out.shape, *reversed(self.out.shape))
            return self.out.new_zeros(shape)
        contributions = self.contributions
        if release:
            del self.contributions
            self.records, self.cotangents, self.gradients = [], [], []
        self.kept = None if release else {}
        flat = gramian_of_factors(
            contributions,
            self.params,
            self.out.numel(),
            self.chunk_bytes,
            release=release,
            keep=self.kept,
        )
        return generalize(flat, self.out.shape, self.batch_dim)

    def vjp(self, weights: Tensor) -> list[Tensor]:
        """``sum_r weights[r] d out[r] / d params`` per leaf, from the tape (fn is not run)."""
        if not self.out.numel():
            return [torch.zeros_like(p) for p in self.params]
        if self.batch_dim is None:
            rows = weights.reshape(-1, 1)
        else:
            rows = weights.movedim(self.batch_dim, -1).reshape(-1, self.out.shape[self.batch_dim])
        return weighted_gradients(self.contributions, self.params, rows, self.kept)


@dataclass(frozen=True)
class Options:
    """The keyword options of a transform, checked once.

    ``chunk_bytes`` bounds the largest intermediate the rules build at once (blocks of ghost
    products, per-sample gradients, unfolded patches): the public ``max_chunk_bytes``.
    ``group``: the ``torch.distributed`` group the samples are spread over, or None.
    """

    batch_dim: int | None
    has_aux: bool
    check_samples: bool
    caller: str
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    group: Any = None
