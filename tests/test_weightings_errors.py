"""Bad inputs to the weightings raise errors that say what went wrong and how to fix it.

The checks of ``G`` are run for every weighting of ``torchgram.weightings.__all__``.
"""

from __future__ import annotations

import pytest
import torch
from test_weightings_properties import NAMES, PREFERENCE, needed_options, weights

from torchgram import weightings as W


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 3, 2), (2, 3, 2, 3)])
def test_gramian_of_the_wrong_shape(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\(G.*\): expected a Gramian of shape S \+ S"):
        weights(name, torch.ones(shape))


@pytest.mark.parametrize("name", NAMES)
def test_non_floating_gramian(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name}\(G.*\): expected a floating-point Gramian"):
        weights(name, torch.eye(3, dtype=torch.int64))


@pytest.mark.parametrize("name", NAMES)
def test_not_a_tensor(name: str) -> None:
    message = rf"^{name}\(G.*\): expected G to be a torch.Tensor, got list"
    with pytest.raises(TypeError, match=message):
        getattr(W, name)([[1.0]], **needed_options(name, 1))


@pytest.mark.parametrize("name", PREFERENCE)
def test_preference_of_the_wrong_shape(name: str) -> None:
    with pytest.raises(ValueError, match=r"expected pref of shape \[3\] .* got shape \[2\]"):
        getattr(W, name)(torch.eye(3), pref=torch.ones(2))
    with pytest.raises(TypeError, match=r"expected pref to be a torch.Tensor or None, got list"):
        getattr(W, name)(torch.eye(3), pref=[1.0, 1.0, 1.0])


def test_constant_weights_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"^constant\(G, weights\): expected weights of shape"):
        W.constant(torch.eye(3), weights=torch.ones(4))


def test_option_values() -> None:
    with pytest.raises(ValueError, match=r"^upgrad\(G\): expected norm_eps >= 0 and reg_eps > 0"):
        W.upgrad(torch.eye(2), reg_eps=0.0)
    with pytest.raises(ValueError, match=r"^upgrad\(G\): expected max_iters >= 1"):
        W.upgrad(torch.eye(2), max_iters=0)
    with pytest.raises(TypeError, match=r"^mgda\(G\): expected max_iters to be an int"):
        W.mgda(torch.eye(2), max_iters=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^mgda\(G\): expected epsilon > 0"):
        W.mgda(torch.eye(2), epsilon=0.0)
    with pytest.raises(ValueError, match=r"^aligned_mtl\(G\): expected scale_mode in"):
        W.aligned_mtl(torch.eye(2), scale_mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^cagrad\(G\): expected c >= 0"):
        W.cagrad(torch.eye(2), c=-1.0)
    with pytest.raises(ValueError, match=r"^fairgrad\(G\): expected alpha >= 0"):
        W.fairgrad(torch.eye(2), alpha=-1.0)
    with pytest.raises(ValueError, match=r"^nash_mtl\(G\): expected max_norm >= 0"):
        W.nash_mtl(torch.eye(2), max_norm=-1.0)


def test_krum_needs_enough_rows() -> None:
    with pytest.raises(ValueError, match=r"^krum\(G\): expected at least .* = 5 rows, got m=4"):
        W.krum(torch.eye(4), n_byzantine=2)
    with pytest.raises(ValueError, match=r"^krum\(G\): expected n_byzantine >= 0"):
        W.krum(torch.eye(4), n_byzantine=-1)


def test_stateful_errors() -> None:
    _, state = W.gradvac(torch.eye(3))
    with pytest.raises(ValueError, match=r"^gradvac\(G\): expected state.phi of shape \[2, 2\]"):
        W.gradvac(torch.eye(2), state=state)
    with pytest.raises(TypeError, match=r"^gradvac\(G\): expected state to be a GradVacState"):
        W.gradvac(torch.eye(2), state=(torch.zeros(2, 2),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^gradvac\(G\): expected beta in \[0.0, 1.0\]"):
        W.gradvac(torch.eye(2), beta=2.0)
    _, cr_state = W.cr_mogm(torch.eye(3), weighting=W.mean)
    with pytest.raises(ValueError, match=r"^cr_mogm\(G, weighting\): expected state.weights of"):
        W.cr_mogm(torch.eye(2), weighting=W.mean, state=cr_state)
    with pytest.raises(ValueError, match=r"^cr_mogm\(G, weighting\): expected alpha in"):
        W.cr_mogm(torch.eye(2), weighting=W.mean, alpha=1.5)
    with pytest.raises(TypeError, match=r"^cr_mogm\(G, weighting\): expected weighting to be a"):
        W.cr_mogm(torch.eye(2), weighting="mgda")  # type: ignore[arg-type]


def test_cross_gramian_weighting_errors() -> None:
    _, modo_state = W.modo(torch.eye(3))
    with pytest.raises(ValueError, match=r"^modo\(G\): expected state.weights of shape \[2\]"):
        W.modo(torch.eye(2), state=modo_state)
    with pytest.raises(TypeError, match=r"^modo\(G\): expected state to be a MoDoState or None"):
        W.modo(torch.eye(2), state=(torch.ones(2) / 2,))  # type: ignore[arg-type]
    for options in [{"gamma": 0.0}, {"gamma": float("inf")}, {"rho": -0.1}, {"rho": float("nan")}]:
        with pytest.raises(ValueError, match=r"^modo\(G\): expected gamma > 0 and rho >= 0"):
            W.modo(torch.eye(2), **options)  # type: ignore[arg-type]
    _, sdm_state = W.sdmgrad(torch.eye(3))
    with pytest.raises(ValueError, match=r"^sdmgrad\(G\): expected state.w of shape \[2\]"):
        W.sdmgrad(torch.eye(2), state=sdm_state)
    with pytest.raises(TypeError, match=r"^sdmgrad\(G\): expected state to be an? SDMGradState"):
        W.sdmgrad(torch.eye(3), state=modo_state)  # type: ignore[arg-type]
    for options in [{"lr": 0.0}, {"lr": -1.0}, {"lambda_": -0.3}]:
        with pytest.raises(ValueError, match=r"^sdmgrad\(G\): expected lr > 0 and lambda_ >= 0"):
            W.sdmgrad(torch.eye(2), **options)  # type: ignore[arg-type]
    for momentum in [-0.1, 1.0]:
        with pytest.raises(ValueError, match=r"^sdmgrad\(G\): expected momentum in \[0, 1\)"):
            W.sdmgrad(torch.eye(2), momentum=momentum)
    with pytest.raises(ValueError, match=r"^sdmgrad\(G\): expected n_iter >= 1, got 0"):
        W.sdmgrad(torch.eye(2), n_iter=0)
    with pytest.raises(TypeError, match=r"^sdmgrad\(G\): expected n_iter to be an int"):
        W.sdmgrad(torch.eye(2), n_iter=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_cross_gramian_of_batches_of_different_sizes(name: str) -> None:
    # cross_gramian(..., batch_dim=0) of batches of 4 and 6 samples: [4, 6], no weights for it.
    message = rf"^{name}\(G\): expected a Gramian .* got shape \[4, 6\]\. .* the same shape S"
    with pytest.raises(ValueError, match=message):
        getattr(W, name)(torch.ones(4, 6))
