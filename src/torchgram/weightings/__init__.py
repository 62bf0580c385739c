"""Weightings: plain functions from a Gramian to the weights of the Jacobian's rows.

A weighting maps the Gramian ``G = J Jᵀ`` of a Jacobian ``J`` to weights ``w`` such that the update
is ``Jᵀw``. Every weighting is a function ``name(G, **options) -> w``:

- ``G`` is an ``[m, m]`` Gramian, or the generalized Gramian of an output of shape ``S`` (shape
  ``S + S[::-1]``, e.g. ``[B, K, K, B]``); the weights then have shape ``S`` (0-D for a 0-D output).
  A generalized Gramian gives the weights of its flattened ``[m, m]`` form, reshaped to ``S``.
- Options are keyword-only, with the defaults of the method's paper or of TorchJD 0.18;
  ``functools.partial(upgrad, pref=p)`` is a configured weighting.
- Stateful methods (``gradvac``, ``cr_mogm``, ``modo``, ``sdmgrad``) take the state of the
  previous call and return the new one: ``w, state = gradvac(G, state=state)``, with
  ``state=None`` on the first call. States are immutable ``NamedTuple``s of tensors
  (``GradVacState``, ``CRMOGMState``, ``MoDoState``, ``SDMGradState``), so they can be stored,
  copied, passed through ``vmap`` or checkpointed like any pytree.
- ``modo`` and ``sdmgrad`` take a cross-Gramian ``G12 = J_1 J_2ᵀ`` of two independent batches
  (``torchgram.cross_gramian``) in place of ``G``, in the same shapes; it is not symmetric in
  general.

All weightings are pure torch (any device and dtype) and work under ``torch.func.vmap`` over a
stack of Gramians; the random ones (``random``, ``pcgrad``, ``gradvac``) need
``randomness="same"`` or ``"different"`` there and no explicit generator.

Degenerate Gramians: a ``G`` holding NaN or inf raises a ``ValueError`` (under ``vmap`` or
``torch.compile``, where an error cannot depend on values, the weights are NaN instead). A float16
or bfloat16 ``G`` is computed in float32 and its weights returned in its dtype. An empty ``G``
(``m = 0``) gives empty weights (``krum`` raises: it needs ``m >= n_byzantine + 3``). What each
weighting returns for a zero, rank-deficient or slightly indefinite ``G``, and for ``m = 1``, is in
its docstring.
"""

from ._aligned_mtl import aligned_mtl
from ._basic import constant, mean, random, sum
from ._cagrad import cagrad
from ._cr_mogm import CRMOGMState, cr_mogm
from ._fairgrad import fairgrad, nash_mtl
from ._gradvac import GradVacState, gradvac
from ._imtl_g import imtl_g
from ._krum import krum
from ._mgda import mgda
from ._modo import MoDoState, modo
from ._pcgrad import pcgrad
from ._sdmgrad import SDMGradState, sdmgrad
from ._upgrad import dualproj, upgrad

__all__ = [
    "CRMOGMState",
    "GradVacState",
    "MoDoState",
    "SDMGradState",
    "aligned_mtl",
    "cagrad",
    "constant",
    "cr_mogm",
    "dualproj",
    "fairgrad",
    "gradvac",
    "imtl_g",
    "krum",
    "mean",
    "mgda",
    "modo",
    "nash_mtl",
    "pcgrad",
    "random",
    "sdmgrad",
    "sum",
    "upgrad",
]
