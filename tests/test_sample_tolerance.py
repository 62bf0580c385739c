"""The sample check's tolerance (``torchgram._samples``): with ``batch_dim``, fn run sample by
sample and fn run on the whole batch may differ by rounding, up to
``eps ** (2 / 3) * max(max |out|, 1)``, and no more.

Small leaks across samples (``h + c * h.mean(0)``) are refused, on every path the check takes:
the batched run compared with the vmapped one, fn on the whole batch compared with the vmapped
run (``has_aux``, where the batched run is not tried), and the same two after a looped run (vmap
cannot run fn). Differences of rounding (another summation order) are accepted, and the Gramian
is then exact against the oracle. A leak that passes fails with the difference and the tolerance
in its message.

Outputs with a common offset and a small spread over the samples (per-sample losses near log K,
as at initialisation) are the hard case: the leak moves the outputs by c times their spread, the
tolerance grows with their size, and the Gramian is off by about c either way (a tolerance of
``sqrt(eps)`` let float32 leaks of 1e-2 and 1e-3 through there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian
from torch.func import jacrev, vmap

import torchgram

B, D_IN, WIDTH, CLASSES = 8, 6, 32, 5
REFUSED = "does not treat samples independently"
LOOPED_WARNING = "ignore:.*cannot run under torch.func.vmap"


def _tolerance(out: torch.Tensor) -> float:
    """The documented tolerance for outputs ``out`` (fn run sample by sample)."""
    return torch.finfo(out.dtype).eps ** (2 / 3) * max(float(out.abs().max()), 1.0)


def _outputs(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` outputs whose spread over the samples is as large as their size."""
    return torch.tanh(x @ p["w"]) @ p["v"]


def _losses(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` cross-entropy losses of a classifier whose head is small, as at initialisation:
    every loss is near log(5) = 1.6, and they differ by a few hundredths."""
    return F.cross_entropy(torch.tanh(x @ p["w"]) @ p["head"], y, reduction="none")


H: dict[str, Callable[..., torch.Tensor]] = {"outputs": _outputs, "losses": _losses}


def _problem(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    p = {
        "w": torch.randn(D_IN, WIDTH, generator=generator, dtype=dtype) / D_IN**0.5,
        "v": torch.randn(WIDTH, generator=generator, dtype=dtype) / WIDTH**0.5,
        "head": 0.01 * torch.randn(WIDTH, CLASSES, generator=generator, dtype=dtype),
    }
    x = torch.randn(B, D_IN, generator=generator, dtype=dtype)
    y = torch.randint(0, CLASSES, (B,), generator=generator)
    return p, x, y


def _per_sample(fn: Callable[..., torch.Tensor], p: Any, x: torch.Tensor, y: torch.Tensor):
    """fn on each sample alone (a batch of one, under vmap), stacked: what the check compares
    fn on the whole batch with."""
    return vmap(lambda xi, yi: fn(p, xi[None], yi[None]))(x, y).squeeze(1)


def _on_path(fn: Callable[..., torch.Tensor], path: str) -> tuple[Callable[..., Any], bool]:
    """fn as the path of the check needs it, and whether it returns aux.

    - ``batched``: the batched run is compared with the vmapped one;
    - ``aux``: with ``has_aux`` the batched run is not tried: fn on the whole batch (without a
      graph) is compared with the vmapped run;
    - ``looped``: fn reads a value on the host, vmap cannot run it: the looped run, compared
      with the batched one;
    - ``looped-aux``: the looped run, compared with fn on the whole batch.
    """
    looped = path.startswith("looped")
    aux = path.endswith("aux")

    def wrapped(p, x, y):
        if looped and float(x.abs().sum()) < 0:  # never: but vmap cannot tell
            raise AssertionError
        out = fn(p, x, y)
        return (out, {"n": x.shape[0]}) if aux else out

    return wrapped, aux


PATHS = ["batched", "aux", "looped", "looped-aux"]
LEAKS = [
    (1e-2, torch.float64),
    (1e-3, torch.float64),
    (1e-6, torch.float64),
    (1e-2, torch.float32),
    (1e-3, torch.float32),
]


@pytest.mark.filterwarnings(LOOPED_WARNING)
@pytest.mark.parametrize(
    ("h", "path"),
    [("outputs", path) for path in PATHS] + [("losses", "batched"), ("losses", "aux")],
)
@pytest.mark.parametrize(("c", "dtype"), LEAKS, ids=[f"{c:g}-{str(d)[6:]}" for c, d in LEAKS])
def test_small_leaks_are_refused(c: float, dtype: torch.dtype, h: str, path: str) -> None:
    p, x, y = _problem(dtype)

    def leaky(p, x, y):
        out = H[h](p, x, y)
        return out + c * out.mean(0)

    gap = float((leaky(p, x, y) - _per_sample(leaky, p, x, y)).abs().max())
    tolerance = _tolerance(_per_sample(leaky, p, x, y))
    fn, aux = _on_path(leaky, path)
    accepted = False
    try:
        with pytest.raises(ValueError, match=REFUSED):
            torchgram.gramian(fn, p, x, y, batch_dim=0, has_aux=aux)
    except pytest.fail.Exception:  # did not raise: say by how much it passed
        accepted = True
    if accepted:
        G = torchgram.gramian(leaky, p, x, y, batch_dim=0, check_samples=False)
        expected = flat_gramian(leaky, {k: v.double() for k, v in p.items()}, x.double(), y)
        error = float((G.double() - expected).abs().max() / expected.abs().max())
        pytest.fail(
            f"a leak of {c:g} across samples ({dtype}, {h}) was accepted: fn on the batch and "
            f"on each sample differ by {gap:.3g}, the tolerance is {tolerance:.3g}; the "
            f"Gramian is off by {error:.3g} of its largest entry",
            pytrace=False,
        )


def _in_another_order(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """``(tanh(x W) * v).sum(-1)``, summed in four parts on a batch and at once on one sample:
    the same function, rounded differently."""
    parts = 4 if x.shape[0] > 1 else 1
    return (torch.tanh(x @ p["w"]) * p["v"]).reshape(x.shape[0], parts, -1).sum(-1).sum(-1)


def _assert_exact(G: torch.Tensor, fn: Callable[..., Any], p, x, y) -> None:
    """``G`` against the oracle in float64 (on the same values): to rounding of G's dtype."""
    expected = flat_gramian(fn, {k: v.double() for k, v in p.items()}, x.double(), y)
    rtol = 1e-5 if G.dtype == torch.float32 else 1e-12
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(G.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.filterwarnings(LOOPED_WARNING)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounding_level_differences_are_accepted_and_exact(dtype: torch.dtype, path: str) -> None:
    p, x, y = _problem(dtype)
    gap = float((_in_another_order(p, x, y) - _per_sample(_in_another_order, p, x, y)).abs().max())
    assert 0 < gap < _tolerance(_per_sample(_in_another_order, p, x, y)) / 10  # rounding
    fn, aux = _on_path(_in_another_order, path)
    transform = torchgram.gramian_of(fn, batch_dim=0, has_aux=aux)
    for _ in range(2):  # the first call checks, the second runs as the first chose
        G = transform(p, x, y)
        _assert_exact(G[0] if aux else G, _in_another_order, p, x, y)


@pytest.mark.parametrize("path", ["batched", "aux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [0.25, 40.0])  # max |out| below 1 (the floor) and above
@pytest.mark.parametrize("factor", [0.3, 3.0])
def test_the_boundary_is_the_documented_tolerance(
    factor: float, size: float, dtype: torch.dtype, path: str
) -> None:
    """A constant added on the batch only (no change to the Jacobian) of ``factor`` times the
    tolerance: accepted (and exact) below it, refused above it."""
    p, x, y = _problem(dtype)
    first = _outputs(p, x, y).abs().argmax()  # first: the probe's sample, compared with it too
    order = torch.cat([first[None], torch.arange(B)[torch.arange(B) != first]])
    x, y = x[order], y[order]
    scale = size / float(_outputs(p, x, y).abs().max())
    tolerance = _tolerance(size * torch.ones((), dtype=dtype))

    def offset(p, x, y):
        return scale * _outputs(p, x, y) + (factor * tolerance if x.shape[0] > 1 else 0.0)

    fn, aux = _on_path(offset, path)
    if factor > 1:
        with pytest.raises(ValueError, match=REFUSED):
            torchgram.gramian(fn, p, x, y, batch_dim=0, has_aux=aux)
        return
    G = torchgram.gramian(fn, p, x, y, batch_dim=0, has_aux=aux)
    _assert_exact(G[0] if aux else G, offset, p, x, y)


def test_mixing_under_has_aux_is_refused_and_the_unmixed_fn_keeps_its_aux() -> None:
    """The check where fn returns aux (fn on the whole batch against the vmapped run): a
    batch-normalised output is refused; without the mixing, G and aux are right."""
    p, x, y = _problem(torch.float64)

    def fn(p, x, y, mix=True):
        h = torch.tanh(x @ p["w"])
        if mix:
            h = (h - h.mean(0)) / (h.std(0) + 1)
        return h @ p["v"], h.sum(-1)

    with pytest.raises(ValueError, match=REFUSED):
        torchgram.gramian(fn, p, x, y, batch_dim=0, has_aux=True)
    unmixed = lambda p, x, y: fn(p, x, y, mix=False)
    G, aux = torchgram.gramian(unmixed, p, x, y, batch_dim=0, has_aux=True)
    _assert_exact(G, lambda p, x, y: unmixed(p, x, y)[0], p, x, y)
    torch.testing.assert_close(aux, torch.tanh(x @ p["w"]).sum(-1))


def _in_bfloat16_pieces(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """``tanh(x W) @ v`` under autocast: one bfloat16 product on a sample, four bfloat16 products
    added in bfloat16 on a batch, which round differently by about bfloat16's eps."""
    h = torch.tanh(x @ p["w"])
    parts = 4 if x.shape[0] > 1 else 1
    pairs = zip(h.chunk(parts, -1), p["v"].chunk(parts), strict=True)
    pieces = [h_part @ v_part for h_part, v_part in pairs]
    out = pieces[0]
    for piece in pieces[1:]:
        out = out + piece
    return out.float()


def test_under_autocast_the_tolerance_is_autocasts() -> None:
    """fn computes in bfloat16 though its output is float32: the runs differ by bfloat16's
    rounding, beyond float32's tolerance and within bfloat16's. Accepted; the Gramian is the
    Jacobian's under autocast, to bfloat16 rounding (per entry, relative to |J_i| |J_j|: 4u for
    gradients rounded at up to two places, and u for the Gramian's own rounding to bfloat16; see
    test_memo's BFLOAT16_GRAMIAN)."""
    p, x, y = _problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_sample = _per_sample(_in_bfloat16_pieces, p, x, y)
        gap = float((_in_bfloat16_pieces(p, x, y) - per_sample).abs().max())
        assert _tolerance(per_sample) < gap < _tolerance(per_sample.bfloat16()) / 4
        G = torchgram.gramian(_in_bfloat16_pieces, p, x, y, batch_dim=0)
        jacobian = jacrev(_in_bfloat16_pieces)(p, x, y)
    J = torch.cat([j.reshape(B, -1) for j in optree.tree_leaves(jacobian)], dim=1).double()
    norms = J.norm(dim=1)
    error = (G.double() - J @ J.T).abs() / (norms[:, None] * norms[None, :])
    assert float(error.max()) <= 5 * 2.0**-8
