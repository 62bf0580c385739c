"""The weightings of a cross-Gramian ``G12 = J_1 J_2ᵀ`` of two batches: ``modo`` and ``sdmgrad``.

Their values against TorchJD 0.18 over successive calls (the state carried), the properties that
hold for a non-symmetric ``G12``, their projection onto the simplex, and training steps on
``torchgram.cross_gramian``. The properties shared by all weightings are checked in
``test_weightings_properties`` (on Gramians, which are valid inputs too).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchjd import aggregation
from torchjd.aggregation._utils.simplex import project_onto_simplex

import torchgram
from torchgram import weightings as W
from torchgram.weightings._simplex import _project_onto_simplex

D = torch.float64
Weighting = Callable[..., tuple[torch.Tensor, Any]]
Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def _cross_gramians(m: int, seed: int, calls: int = 4, mean: float = 1.0) -> list[torch.Tensor]:
    """``J_1 J_2ᵀ`` [m, m] for ``calls`` pairs of Jacobians ``J_b = mean * J + E_b`` [m, 7] of two
    batches: a full-data Jacobian ``J`` (another each call) and independent noises ``E_b`` of
    half its size. ``mean=0``: unrelated batches, a ``G12`` far from any Gramian."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(calls):
        J, E_1, E_2 = (torch.randn(m, 7, generator=generator, dtype=D) for _ in range(3))
        out.append((mean * J + 0.5 * E_1) @ (mean * J + 0.5 * E_2).T)
    return out


INPUTS = {
    **{f"m={m}, another G12 each call": _cross_gramians(m, seed=m) for m in [2, 3, 5, 7]},
    "m=3, the same G12 each call": _cross_gramians(3, seed=0, calls=1) * 4,
    "m=4, unrelated batches": _cross_gramians(4, seed=4, mean=0.0),
}
PREF = torch.tensor([0.1, 0.5, 0.2, 0.7, 0.3, 0.4, 0.2], dtype=D)


def _over_calls(f: Weighting, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
    """The weights and states of ``f`` over successive calls, the state carried."""
    ws, states, state = [], [], None
    for G12 in inputs:
        w, state = f(G12, state=state)
        ws.append(w)
        states.append(state)
    return ws, states


@pytest.mark.parametrize("inputs", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "rho": 0.0}, {"gamma": 0.02, "rho": 2.0}])
def test_modo_equals_torchjd_over_calls(
    inputs: list[torch.Tensor], options: dict[str, Any]
) -> None:
    reference = aggregation.MoDoWeighting(**options)
    ws, states = _over_calls(partial(W.modo, **options), inputs)
    for G12, w, state in zip(inputs, ws, states, strict=True):
        torch.testing.assert_close(w, reference(G12), atol=1e-12, rtol=0)
        assert torch.equal(state.weights, w)


SDMGRAD_OPTIONS = {
    "defaults": {},
    "lr=0.1": {"lr": 0.1},
    "lr=0.1, pref": {"lr": 0.1, "pref": PREF},
    "lr=1, no momentum, 5 steps, lambda_=0": {
        "lr": 1.0, "momentum": 0.0, "n_iter": 5, "lambda_": 0.0
    },
}  # fmt: skip


@pytest.mark.parametrize("case", INPUTS)
@pytest.mark.parametrize("options", SDMGRAD_OPTIONS.values(), ids=SDMGRAD_OPTIONS.keys())
def test_sdmgrad_equals_torchjd_over_calls(case: str, options: dict[str, Any]) -> None:
    inputs = INPUTS[case]
    m = inputs[0].shape[0]
    options = {k: (v[:m] if k == "pref" else v) for k, v in options.items()}
    theirs = {("pref_vector" if k == "pref" else k): v for k, v in options.items()}
    reference = aggregation.SDMGradWeighting(**theirs)
    ws, states = _over_calls(partial(W.sdmgrad, **options), inputs)
    for G12, w in zip(inputs, ws, strict=True):
        torch.testing.assert_close(w, reference(G12), atol=1e-12, rtol=0)
    if options.get("lr", 10.0) < 1.0 and "unrelated" not in case:
        # A small lr keeps w off the corners of the simplex: the comparison is not trivial.
        assert all(int((state.w > 1e-3).sum()) >= 2 for state in states)


@pytest.mark.parametrize("f", [W.modo, partial(W.sdmgrad, lr=0.1)], ids=["modo", "sdmgrad"])
def test_generalized_cross_gramian_gives_reshaped_weights(f: Weighting) -> None:
    # Two batches whose outputs have the shape [2, 3]: G12 of shape [2, 3, 3, 2], not symmetric.
    generator = torch.Generator().manual_seed(0)
    J_1, J_2 = (torch.randn(2, 3, 7, generator=generator, dtype=D) for _ in range(2))
    G_gen = torch.einsum("bkp,clp->bklc", J_1, J_2)
    flat = J_1.reshape(6, 7) @ J_2.reshape(6, 7).T
    ws, _ = _over_calls(f, [G_gen, 2.0 * G_gen])
    expected, _ = _over_calls(f, [flat, 2.0 * flat])
    for w, e in zip(ws, expected, strict=True):
        torch.testing.assert_close(w, e.reshape(2, 3), atol=1e-14, rtol=0)


@pytest.mark.parametrize("f", [W.modo, partial(W.sdmgrad, lr=0.1)], ids=["modo", "sdmgrad"])
@settings(max_examples=10, deadline=None)
@given(m=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_permutation_equivariance_of_a_non_symmetric_input(f: Weighting, m: int, seed: int) -> None:
    inputs = _cross_gramians(m, seed, calls=3)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    ws, _ = _over_calls(f, inputs)
    permuted, _ = _over_calls(f, [G12[perm][:, perm] for G12 in inputs])
    for w, p in zip(ws, permuted, strict=True):
        torch.testing.assert_close(p, w[perm], atol=1e-12, rtol=0)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(2, 7), seed=st.integers(0, 2**16), c=st.sampled_from([1e-3, 0.5, 7.0, 1e3]))
def test_modo_gamma_is_a_step_size_in_the_units_of_g12(m: int, seed: int, c: float) -> None:
    inputs = _cross_gramians(m, seed, calls=3)
    scaled, _ = _over_calls(partial(W.modo, gamma=0.3 / c, rho=0.2 * c), [c * G for G in inputs])
    ws, _ = _over_calls(partial(W.modo, gamma=0.3, rho=0.2), inputs)
    torch.testing.assert_close(scaled, ws, atol=1e-12, rtol=0)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(2, 7), seed=st.integers(0, 2**16), c=st.sampled_from([0.5, 7.0, 1e3, 1e6]))
def test_sdmgrad_is_scale_invariant(m: int, seed: int, c: float) -> None:
    inputs = _cross_gramians(m, seed, calls=3)
    scaled, _ = _over_calls(partial(W.sdmgrad, lr=0.1), [c * G for G in inputs])
    ws, _ = _over_calls(partial(W.sdmgrad, lr=0.1), inputs)
    # Up to the 1e-8 added to s² (about 7 here): it moves the weights by about 2e-9.
    torch.testing.assert_close(scaled, ws, atol=2e-8, rtol=0)


def _vectors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    random = [
        torch.randn(m, generator=generator, dtype=D) * s for m in [1, 2, 5, 9] for s in [0.1, 3]
    ]
    return [
        *random,
        torch.tensor([0.2, 0.3, 0.5], dtype=D),  # on the simplex already
        torch.tensor([0.4, 0.4, 0.4, -1.0], dtype=D),  # ties
        torch.tensor([1.0, 1.0, 1.0], dtype=D),
        torch.tensor([-5.0, -5.0, 7.0, 1e3], dtype=D),
        torch.zeros(4, dtype=D),
    ]  # fmt: skip


@pytest.mark.parametrize("y", _vectors())
def test_projection_onto_the_simplex(y: torch.Tensor) -> None:
    x = _project_onto_simplex(y)
    torch.testing.assert_close(x, project_onto_simplex(y), atol=1e-14, rtol=0)
    assert (x >= 0).all() and abs(float(x.sum()) - 1.0) < 1e-14
    # Optimality: y - x is θ 1 on the support of x and at most θ off it.
    theta = (y - x)[x > 0]
    torch.testing.assert_close(theta, theta[:1].expand_as(theta), atol=1e-14, rtol=0)
    assert ((y - x)[x == 0] <= theta[0] + 1e-14).all()
    torch.testing.assert_close(_project_onto_simplex(x), x, atol=1e-15, rtol=0)


def test_projection_under_vmap() -> None:
    stack = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    looped = torch.stack([project_onto_simplex(y) for y in stack])
    torch.testing.assert_close(torch.func.vmap(_project_onto_simplex)(stack), looped)


@pytest.mark.parametrize("f", [W.modo, partial(W.sdmgrad, lr=0.1)], ids=["modo", "sdmgrad"])
def test_vmap_with_states_equals_loop(f: Weighting) -> None:
    pairs = [_cross_gramians(4, seed, calls=2) for seed in range(3)]
    firsts, seconds = (torch.stack([pair[call] for pair in pairs]) for call in range(2))
    w_1, states = torch.func.vmap(f)(firsts)
    w_2, _ = torch.func.vmap(lambda G, state: f(G, state=state))(seconds, states)
    for i in range(3):
        ws, _ = _over_calls(f, [firsts[i], seconds[i]])
        torch.testing.assert_close(torch.stack([w_1[i], w_2[i]]), torch.stack(ws))


@pytest.mark.parametrize("f", [W.modo, partial(W.sdmgrad, lr=0.1)], ids=["modo", "sdmgrad"])
def test_weights_and_states_are_detached_immutable_and_the_input_kept(f: Weighting) -> None:
    G12 = _cross_gramians(3, seed=0, calls=1)[0].requires_grad_(True)
    copy = G12.detach().clone()
    w, state = f(G12)
    w, state = f(G12, state=state)
    assert not w.requires_grad and not state[0].requires_grad
    assert torch.equal(G12.detach(), copy)
    with pytest.raises(AttributeError):
        setattr(state, state._fields[0], torch.zeros(3))


def test_a_state_of_another_dtype_is_converted() -> None:
    inputs = _cross_gramians(3, seed=0, calls=2)
    _, state = W.modo(inputs[0].float())
    w, _ = W.modo(inputs[1], state=state)
    expected, _ = W.modo(inputs[1], state=W.MoDoState(state.weights.double()))
    assert w.dtype == D
    torch.testing.assert_close(w, expected)


# Training steps with cross_gramian: a 2-task model, two batches a step.


def _two_task_model() -> tuple[Callable[..., torch.Tensor], Params]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = model.double()

    def losses(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, params, (x,))
        return ((out - y) ** 2).mean(dim=0)  # [2]

    return losses, {k: v.detach() for k, v in model.named_parameters()}


def _jacobian(fn: Callable[..., torch.Tensor], params: Params, *args: torch.Tensor) -> torch.Tensor:
    """The oracle ``J`` [m, P] of fn's outputs with respect to all the parameters."""
    jacobians = torch.func.jacrev(fn)(params, *args)
    return torch.cat([j.flatten(1) for j in jacobians.values()], dim=1)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(W.modo, aggregation.MoDoWeighting()),
     (partial(W.sdmgrad, lr=0.1), aggregation.SDMGradWeighting(lr=0.1))],
    ids=["modo", "sdmgrad"],
)  # fmt: skip
def test_training_steps_on_cross_gramian_equal_torchjd_on_jacrev(
    ours: Weighting, theirs: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    losses, params = _two_task_model()
    generator = torch.Generator().manual_seed(1)
    state = None
    for _ in range(3):
        x_1, x_2 = (torch.randn(16, 4, generator=generator, dtype=D) for _ in range(2))
        y_1, y_2 = (torch.randn(16, 2, generator=generator, dtype=D) for _ in range(2))
        G12 = torchgram.cross_gramian(losses, params, (x_1, y_1), (x_2, y_2))
        oracle = _jacobian(losses, params, x_1, y_1) @ _jacobian(losses, params, x_2, y_2).T
        assert G12.shape == (2, 2) and not torch.allclose(G12, G12.T)  # a cross-Gramian
        torch.testing.assert_close(G12, oracle, atol=1e-12, rtol=1e-12)
        w, state = ours(G12, state=state)
        torch.testing.assert_close(w, theirs(oracle), atol=1e-12, rtol=0)
        # MoDo's update (eq. 2.9b): the weighted mean of both batches' losses.
        batches = ((x_1, y_1), (x_2, y_2))
        grads = torch.func.grad(_weighted_mean)(params, losses, batches, w)
        params = {k: v - 0.5 * grads[k] for k, v in params.items()}


def _weighted_mean(
    params: Params, losses: Callable[..., torch.Tensor], batches: tuple[Batch, ...], w: torch.Tensor
) -> torch.Tensor:
    """The mean over the batches of the losses weighted by ``w``."""
    return torch.stack([losses(params, *batch) @ w for batch in batches]).mean()


def test_the_docs_training_step_runs() -> None:
    page = (Path(__file__).parents[1] / "docs" / "weightings.md").read_text(encoding="utf-8")
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "cross_gramian(" in b]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    assert isinstance(namespace["state"], W.MoDoState)
    assert namespace["w"].shape == (2,) and abs(float(namespace["w"].sum()) - 1.0) < 1e-6
