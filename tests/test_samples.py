"""The first call's checks: fn treats samples independently on the whole batch (randomness and an
outer vmap included), and its runs in one call agree (fn that changes state it reads is refused
where it would run more than once, exact where it runs once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import torchgram

D = torch.float64
B = 6


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 3, dtype=D), "v": torch.randn(3, dtype=D)}


def _h(p, x):
    return torch.tanh(x @ p["w"])  # [B, 3]


# fns that mix samples beyond the first two, where a check on two samples saw nothing
MIXING = {
    "later-samples": lambda p, x: torch.cat(
        [_h(p, x[:2]) @ p["v"], (_h(p, x[2:]) + _h(p, x[:-2])) @ p["v"]]
    ),
    "branch-on-batch-size": lambda p, x: (_h(p, x) * (2.0 if x.shape[0] > 2 else 1.0)) @ p["v"],
    "sort": lambda p, x: (_h(p, x) @ p["v"]).sort().values,
    "mean-over-batch": lambda p, x: (_h(p, x) - _h(p, x).mean(0)) @ p["v"],
    "leak-1e-2": lambda p, x: (_h(p, x) + 1e-2 * _h(p, x).mean(0)) @ p["v"],
}


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_anywhere_in_the_batch_is_refused(name) -> None:
    x = torch.randn(B, 4, dtype=D)
    if name == "sort":  # the first two already in order: only later samples are moved
        x = x[(_h(_params(), x) @ _params()["v"]).argsort()]
        x = torch.cat([x[:2], x[2:].flip(0)])
    with pytest.raises(ValueError, match="does not treat samples independently: on the whole"):
        torchgram.gramian(MIXING[name], _params(), x, batch_dim=0)


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_is_refused_with_randomness_and_under_an_outer_vmap(name) -> None:
    """Dropout no longer skips the check (both runs draw the same masks), nor does an outer vmap
    (the outputs are compared beneath it)."""
    x = torch.randn(B, 4, dtype=D)

    def noisy(p, x):
        return MIXING[name](p, F.dropout(x, 0.3, training=True))

    with pytest.raises(ValueError, match="does not treat samples independently"):
        torchgram.gramian(noisy, _params(), x, batch_dim=0)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in _params().items()}
    transform = vmap(torchgram.gramian_of(MIXING[name], batch_dim=0), in_dims=(0, None))
    with pytest.raises(ValueError, match="does not treat samples independently"):
        transform(stacked, x)


def test_rounding_level_differences_are_accepted() -> None:
    """fn run on the batch and on each sample differ by rounding (another reduction order):
    accepted, and the Gramian is exact."""

    def fn(p, x):  # 6e-14 added on the batch, 1e-14 on a sample
        return _h(p, x) @ p["v"] + 1e-14 * x.shape[0]

    p, x = _params(), torch.randn(B, 4, dtype=D)
    G = torchgram.gramian(fn, p, x, batch_dim=0)
    assert torch.allclose(G, flat_gramian(fn, p, x), rtol=1e-10)


def test_nan_is_named_where_only_one_run_holds_it() -> None:
    def fn(p, x):  # NaN in the batch's run only
        h = _h(p, x) @ p["v"]
        return h + (torch.nan if x.shape[0] > 1 else 0.0) * (x[:, 0] > 10).to(D)

    x = torch.randn(B, 4, dtype=D)
    x[3, 0] = 20.0
    with pytest.raises(ValueError, match="one holds NaN where the other does not"):
        torchgram.gramian(fn, _params(), x, batch_dim=0)


def test_nan_in_the_parameters_is_not_taken_for_mixing() -> None:
    """The same NaN in both runs: not mixing; the Gramian holds NaN where the Jacobian does."""
    p = _params()
    p["w"][0, 0] = torch.nan
    fn = lambda p, x: _h(p, x) @ p["v"]
    G = torchgram.gramian(fn, p, torch.randn(B, 4, dtype=D), batch_dim=0)
    assert G.isnan().all()


class WithSideEffect(nn.Module):
    """Adds one to a buffer on every forward, and uses it (as in TorchJD's test zoo)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).double()
        self.register_buffer("count", torch.zeros((), dtype=D))

    def forward(self, x):
        self.count = self.count + 1.0
        return (self.linear(x) * self.count).pow(2).sum(-1)


def _stateful() -> tuple[WithSideEffect, dict[str, torch.Tensor], torch.Tensor]:
    model = WithSideEffect()
    return model, {k: v.detach() for k, v in model.named_parameters()}, torch.randn(B, 4, dtype=D)


def test_state_changing_fn_runs_once_without_batch_dim() -> None:
    """Without batch_dim fn runs once per call: the Gramian is that of the state the call
    found, and the buffer moves by one per call, as a plain forward's does."""
    model, params, x = _stateful()
    fn = lambda params, x: functional_call(model, params, (x,))
    for call in range(1, 4):
        found = model.count.clone()

        def at_found(params, x, found=found):
            params = {k.removeprefix("linear."): v for k, v in params.items()}
            return (functional_call(model.linear, params, (x,)) * (found + 1)).pow(2).sum(-1)

        G = torchgram.gramian(fn, params, x)
        assert torch.allclose(G, flat_gramian(at_found, params, x), rtol=1e-10)
        assert float(model.count) == call


def test_state_changing_fn_is_refused_where_the_first_call_runs_it_more_than_once() -> None:
    model, params, x = _stateful()
    fn = lambda params, x: functional_call(model, params, (x,))
    with pytest.raises(ValueError, match="does not treat samples independently|different outputs"):
        torchgram.gramian(fn, params, x, batch_dim=0)
    with pytest.raises(ValueError, match="different outputs in two runs.*a probe ran it"):
        torchgram.gramian(fn, params, x[:1], batch_dim=0)  # one sample: no sample check
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    with pytest.raises(ValueError, match="different outputs in two runs.*a probe learned"):
        vmap(torchgram.gramian_of(fn), in_dims=(0, None))(stacked, x)  # a probe first


def test_outer_vmap_checks_every_member() -> None:
    """Beneath an outer vmap the check sees every ensemble member: a member whose run mixes
    samples is refused even where the first does not."""
    members = [nn.Linear(4, 1).double() for _ in range(3)]
    stacked, _ = stack_module_state(members)
    base = members[0]

    def fn(params, x):
        out = functional_call(base, params, (x,)).squeeze(-1)
        return out + (out.mean() * (params["bias"].abs() > 5).to(D).squeeze())  # mixes if big

    stacked["bias"] = torch.tensor([[0.0], [0.0], [9.0]], dtype=D)
    x = torch.randn(B, 4, dtype=D)
    with pytest.raises(ValueError, match="does not treat samples independently"):
        vmap(torchgram.gramian_of(fn, batch_dim=0), in_dims=(0, None))(stacked, x)
    stacked["bias"] = torch.zeros(3, 1, dtype=D)
    G = vmap(torchgram.gramian_of(fn, batch_dim=0), in_dims=(0, None))(stacked, x)
    for i in range(3):
        member = {k: v[i] for k, v in stacked.items()}
        assert torch.allclose(G[i], flat_gramian(fn, member, x), rtol=1e-10)
