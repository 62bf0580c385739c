"""The convolution rule: exact for every stride, padding, dilation and group count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rule_check import check_exact, rule_counts
from torch import nn
from torch.func import functional_call

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _case(n: int, batch: int = 3, size: int = 6, **conv):
    torch.manual_seed(0)
    layer = CONVS[n](4, 6, **conv).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(batch, 4, *(size,) * n, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(functional_call(layer, params, (x,))).pow(2).flatten(1).sum(-1)

    return fn, params, x


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "conv",
    [
        {"kernel_size": 3},
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": 2, "padding": "same", "dilation": 2},
        {"kernel_size": 3, "padding": "valid", "bias": False},
        {"kernel_size": 3, "groups": 2, "padding": 1},
        {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    ],
    ids=["plain", "stride-pad", "same-dilated", "valid-nobias", "groups", "circular"],
)
def test_conv_matches_oracle_and_generic(monkeypatch, n, conv) -> None:
    size = 4 if n == 3 else 6
    fn, params, x = _case(n, size=size, **conv)
    check_exact(monkeypatch, fn, params, x)
    assert rule_counts(fn, params, x) == {(f"conv{n}d", f"conv{n}d"): 1}


def test_depthwise_and_reflect_padding(monkeypatch) -> None:
    torch.manual_seed(0)
    depthwise = nn.Conv2d(4, 8, 3, groups=4, padding=1, padding_mode="reflect").double()
    params = {k: v.detach() for k, v in depthwise.named_parameters()}
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def fn(params, x):
        return functional_call(depthwise, params, (x,)).pow(2).sum((1, 2, 3))

    check_exact(monkeypatch, fn, params, x)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_several_outputs_per_sample_and_no_batch_dim(monkeypatch, batch_dim) -> None:
    fn, params, x = _case(2, stride=2, kernel_size=3, groups=2)

    def two(params, x):
        return torch.stack([fn(params, x), fn(params, x.flip(-1))], dim=-1)  # [B, 2]

    check_exact(monkeypatch, two, params, x, batch_dim=batch_dim)


def test_unbatched_image_and_weight_used_twice(monkeypatch) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)

    def fn(params, x):
        h = torch.tanh(F.conv2d(x, params["w"], padding=1))
        return F.conv2d(h, params["w"], padding=1).pow(2).sum((-1, -2, -3))

    check_exact(monkeypatch, fn, {"w": w}, x)

    def unbatched(params, x):  # conv on one [C, H, W] image
        return F.conv2d(x[1], params["w"], stride=2).pow(2).sum((-1, -2))

    check_exact(monkeypatch, unbatched, {"w": w}, x, batch_dim=None)


@pytest.mark.parametrize("chunk", [1, 2**12, 2**30])
def test_small_chunks_give_the_same_gramian(monkeypatch, chunk) -> None:
    fn, params, x = _case(2, batch=5, size=8, kernel_size=3, padding=1)
    check_exact(monkeypatch, fn, params, x, max_chunk_bytes=chunk)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialised"])
@pytest.mark.parametrize("chunk", [1, 2**11, 2**30])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rows", [1, 2])
def test_both_forms_in_blocks_of_channels(monkeypatch, ghost, chunk, groups, rows) -> None:
    """Each form, with blocks of one output channel (or group) up to the whole weight, and with
    one or two output rows per sample (the blocks then hold K*B rows)."""
    import torchgram._factors_conv as conv

    monkeypatch.setattr(conv, "use_ghost", lambda *shapes: ghost)
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)

    def fn(params, x):
        h = functional_call(layer, params, (x,)).flatten(1)
        return torch.stack([h.pow(2).sum(-1), h.sin().sum(-1)][:rows], dim=-1)  # [B, rows]

    check_exact(monkeypatch, fn, params, x, max_chunk_bytes=chunk)
