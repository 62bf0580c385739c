"""Property: on random small models made of the layer kinds the rules cover, with random output
shapes, batch_dim and in_dims, the Gramian equals the oracle's (float64), and so does vjp_fn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import flat_gramian, jacobian_matrix

import torchgram

D = torch.float64
WIDTH = 4  # the width of every hidden layer

# A layer: (name, make(params, prefix, generator) -> None, apply(params, prefix, h) -> h), on
# h of shape [B, T, WIDTH]. Each kind is one the rules treat in their own way.
Layer = tuple[str, Callable[..., None], Callable[..., torch.Tensor]]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D) / shape[-1] ** 0.5


def _linear(p, k):
    p[k + "w"], p[k + "b"] = _randn(WIDTH, WIDTH), _randn(WIDTH)


def _weight(p, k):
    p[k + "w"] = _randn(WIDTH, WIDTH)


def _affine(p, k):
    p[k + "w"], p[k + "b"] = 1 + _randn(WIDTH), _randn(WIDTH)


def _conv(p, k):
    p[k + "w"], p[k + "b"] = _randn(WIDTH, WIDTH // 2, 3), _randn(WIDTH)


def _attention(p, k):
    p[k + "in"], p[k + "out"] = _randn(3 * WIDTH, WIDTH), _randn(WIDTH, WIDTH)


def _attend(p, k, h):
    out, _ = F.multi_head_attention_forward(
        h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), WIDTH, 2,
        p[k + "in"], None, None, None, False, 0.0, p[k + "out"], None,
        training=False, need_weights=False,
    )  # fmt: skip
    return out.transpose(0, 1)


LAYERS: list[Layer] = [
    ("linear", _linear, lambda p, k, h: torch.tanh(F.linear(h, p[k + "w"], p[k + "b"]))),
    ("matmul", _weight, lambda p, k, h: torch.sin(h @ p[k + "w"])),
    ("einsum", _weight, lambda p, k, h: torch.tanh(torch.einsum("btd,ed->bte", h, p[k + "w"]))),
    ("tied", _weight, lambda p, k, h: torch.tanh(h @ p[k + "w"]) @ p[k + "w"].T),
    ("layer_norm", _affine, lambda p, k, h: F.layer_norm(h, (WIDTH,), p[k + "w"], p[k + "b"])),
    ("rms_norm", _affine, lambda p, k, h: F.rms_norm(h, (WIDTH,), p[k + "w"])),
    (
        "group_norm",
        _affine,
        lambda p, k, h: F.group_norm(h.transpose(1, 2), 2, p[k + "w"], p[k + "b"]).transpose(1, 2),
    ),
    ("scale_shift", _affine, lambda p, k, h: torch.tanh(h * p[k + "w"] + p[k + "b"])),
    (
        "conv1d",
        _conv,
        lambda p, k, h: torch.tanh(
            F.conv1d(h.transpose(1, 2), p[k + "w"], p[k + "b"], padding=1, groups=2)
        ).transpose(1, 2),
    ),
    ("attention", _attention, _attend),
    ("prelu", lambda p, k: p.__setitem__(k + "a", _randn(1) + 0.3),
     lambda p, k, h: F.prelu(h, p[k + "a"])),  # the generic rule
]  # fmt: skip


def _model(kinds: list[int], heads: int, embed: bool) -> tuple[dict[str, torch.Tensor], Any]:
    params: dict[str, torch.Tensor] = {}
    if embed:
        params["embed"] = _randn(7, WIDTH)
    for i, kind in enumerate(kinds):
        LAYERS[kind][1](params, f"l{i}.")
    params["head"] = _randn(heads, WIDTH)

    def body(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = F.embedding(x, params["embed"]) if embed else x  # [B, T, WIDTH]
        for i, kind in enumerate(kinds):
            h = LAYERS[kind][2](params, f"l{i}.", h)
        return (h.pow(2).mean(1) @ params["head"].T) ** 2  # [B, heads]

    return params, body


@st.composite
def settings_(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "kinds": draw(st.lists(st.integers(0, len(LAYERS) - 1), min_size=1, max_size=3)),
        "heads": draw(st.integers(1, 3)),
        "embed": draw(st.booleans()),
        "batch": draw(st.integers(1, 4)),
        "tokens": draw(st.integers(1, 3)),
        "output": draw(st.sampled_from(["[B]", "[B, K]", "[K, B]", "[K, B, 1]"])),
        "batch_dim": draw(st.booleans()),
        "samples_on": draw(st.integers(0, 1)),  # in_dims
    }


_OUTPUTS = {  # the output's shape, and where its samples lie
    "[B]": (lambda z: z.sum(-1), 0),
    "[B, K]": (lambda z: z, 0),
    "[K, B]": (lambda z: z.T, 1),
    "[K, B, 1]": (lambda z: z.T.unsqueeze(-1), 1),
}


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(settings_())
def test_random_models_match_the_oracle(drawn: dict[str, Any]) -> None:
    torch.manual_seed(0)  # each example's values are its own, the same when replayed
    params, body = _model(drawn["kinds"], drawn["heads"], drawn["embed"])
    shape, sample_dim = _OUTPUTS[drawn["output"]]
    batch, tokens, on = drawn["batch"], drawn["tokens"], drawn["samples_on"]
    if drawn["embed"]:
        x = torch.randint(0, 7, (batch, tokens))
    else:
        x = torch.randn(batch, tokens, WIDTH, dtype=D)
    x = x.movedim(0, on)  # the samples at in_dims

    def fn(params: dict[str, torch.Tensor], x: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * shape(body(params, x.movedim(on, 0)))

    batch_dim = sample_dim if drawn["batch_dim"] else None
    out, vjp_fn, G = torchgram.vjp_and_gramian(
        fn, params, x, 2.0, batch_dim=batch_dim, in_dims=(0, on, None)
    )
    expected = flat_gramian(fn, params, x, 2.0)
    assert G.shape == (*out.shape, *reversed(out.shape))
    scale = expected.abs().max().clamp(min=1e-30)
    assert float((torchgram.flatten(G) - expected).abs().max() / scale) < 1e-9
    weights = torch.randn_like(out)
    J = jacobian_matrix(fn, params, x, 2.0)
    direction = torch.cat([g.reshape(-1) for g in optree.tree_leaves(vjp_fn(weights))])
    reference = weights.reshape(-1) @ J
    assert float((direction - reference).abs().max()) < 1e-9 * float(reference.abs().max() + 1)
