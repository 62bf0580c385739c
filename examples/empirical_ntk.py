"""The empirical neural tangent kernel of a network between two batches.

The empirical NTK of a network ``f(params, x) -> [C]`` is
``Θ(x1, x2)[a, b] = <d f(x1)[a] / d params, d f(x2)[b] / d params>``: for batches of N1 and N2
inputs, an ``[N1, N2, C, C]`` tensor. It is a block of a Gramian: on the concatenated batch of
N1 + N2 inputs, the outputs ``[N, C]`` have the generalized Gramian ``G [N, C, C, N]`` with
``G[n, a, b, m] = <d out[n, a], d out[m, b]>``, and the NTK is its cross block
``G[:N1, :, :, N1:]``. The example compares it with the Jacobian-contraction NTK of the
``torch.func`` tutorial (per-sample Jacobians from ``vmap(jacrev)``, then an einsum).

Run: python examples/empirical_ntk.py
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import torchgram

Tensor = torch.Tensor


def ntk_from_gramian(f, params, x1: Tensor, x2: Tensor) -> Tensor:
    """``[N1, N2, C, C]``: the cross block of the Gramian of ``f``'s outputs on ``cat(x1, x2)``."""
    G = torchgram.gramian(f, params, torch.cat([x1, x2]), batch_dim=0)  # [N, C, C, N]
    return G[: len(x1), :, :, len(x1) :].permute(0, 3, 1, 2)


def ntk_from_jacobians(f, params, x1: Tensor, x2: Tensor) -> Tensor:
    """``[N1, N2, C, C]``: the torch.func tutorial's Jacobian contraction."""

    def one(params, x):  # [C] for one input
        return f(params, x[None])[0]

    jac1 = vmap(jacrev(one), in_dims=(None, 0))(params, x1)  # {name: [N1, C, *p.shape]}
    jac2 = vmap(jacrev(one), in_dims=(None, 0))(params, x2)
    return sum(
        torch.einsum("naf,mbf->nmab", jac1[k].flatten(2), jac2[k].flatten(2)) for k in params
    )


def main(n1: int = 20, n2: int = 30, width: int = 64, seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    ).double()  # float64: the two constructions agree to ~1e-12
    params = {name: p.detach() for name, p in model.named_parameters()}
    x1, x2 = (
        torch.randn(n1, 1, 8, 8, dtype=torch.float64),
        torch.randn(n2, 1, 8, 8, dtype=torch.float64),
    )

    def f(params, x):  # [N, C]
        return functional_call(model, params, (x,))

    ntk, ours = _timed(ntk_from_gramian, f, params, x1, x2)
    reference, theirs = _timed(ntk_from_jacobians, f, params, x1, x2)
    error = float((ntk - reference).abs().max() / reference.abs().max())
    print(f"empirical NTK between {n1} and {n2} inputs of a CNN with 10 outputs: {list(ntk.shape)}")
    print(f"best of 3: {ours:.3f}s from the Gramian, {theirs:.3f}s from vmap(jacrev) + einsum")
    print(f"max relative difference: {error:.2e}")
    trace = ntk.diagonal(dim1=2, dim2=3).sum(-1)  # [N1, N2], the trace NTK
    print(f"trace NTK Σ_a Θ[:, :, a, a]: mean {trace.mean():.3f}, max {trace.max():.3f}")
    return {"ntk": ntk, "reference": reference, "error": error}


def _timed(function, *args, repeats: int = 3) -> tuple[Tensor, float]:
    """The result and the best wall-clock time of a few calls (the first one warms up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return result, min(times)


if __name__ == "__main__":
    main()
