"""Models for the exactness tests: each case gives fn, params and args (float64)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class Case:
    fn: Callable[..., Any]
    params: Any
    args: tuple[Any, ...]
    batch_dim: int | None = 0
    in_dims: Any = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


def _module_case(model: nn.Module, x: torch.Tensor, per_sample=None, **options) -> Case:
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    reduce = per_sample or (lambda out: out.flatten(1).pow(2).sum(1))

    def fn(params, x):
        return reduce(functional_call(model, params, (x,)))

    return Case(fn, params, (x.double() if x.is_floating_point() else x,), **options)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.norm(self.conv2(x)))
        x = self.depthwise(x).mean(dim=(2, 3))
        return self.head(x)


class EmbedConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 5, padding_idx=0)
        self.conv = nn.Conv1d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)
        return self.head(torch.tanh(self.conv(h)).mean(-1))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 3))
        self.frozen = nn.Linear(3, 3)

    def forward(self, x):
        return self.frozen(self.layer(x) * self.scale)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True, kdim=4, vdim=5)

    def forward(self, q, k, v):
        return self.attn(q, k, v, need_weights=False)[0]


def _pure_fn(params, x):
    h = torch.tanh(x @ params["layers"][0]["w"] + params["layers"][0]["b"])
    h = torch.einsum("bi,ij->bj", h, params["layers"][1])
    return (h * params["scale"] + params["shift"]).pow(2).sum(-1)


def _free_matmul(params, x):
    return torch.tanh(x @ params["W"]).sum((-1, -2)) + (params["W"] @ x.transpose(-1, -2)).pow(
        2
    ).sum((-1, -2))


def cases() -> dict[str, Case]:
    torch.manual_seed(0)
    B = 3
    out: dict[str, Case] = {}
    out["mlp"] = _module_case(
        nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), torch.randn(B, 5)
    )
    out["cnn"] = _module_case(TinyCNN(), torch.randn(B, 3, 8, 8))
    out["conv1d_embedding"] = _module_case(EmbedConv1d(), torch.randint(0, 11, (B, 6)))
    out["conv1d_embedding"].args = (
        torch.tensor([[1, 2, 0, 3, 3, 4], [0, 0, 5, 6, 7, 1], [2, 2, 2, 9, 10, 0]]),
    )
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    out["transformer"] = _module_case(layer, torch.randn(B, 4, 8))
    att = Attention().double()
    attp = {k: v.detach() for k, v in att.named_parameters()}
    out["mha_kdim_vdim"] = Case(
        lambda p, q, k, v: functional_call(att, p, (q, k, v)).pow(2).sum((1, 2)),
        attp,
        (
            torch.randn(B, 3, 6).double(),
            torch.randn(B, 4, 4).double(),
            torch.randn(B, 4, 5).double(),
        ),
    )
    out["free_matmul"] = Case(
        _free_matmul, {"W": torch.randn(5, 5).double()}, (torch.randn(B, 2, 5).double(),)
    )
    out["module_twice"] = _module_case(Twice(), torch.randn(B, 2, 4))
    tied = TiedLM()
    out["tied_weights"] = _module_case(
        tied, torch.randint(0, 9, (B, 5)), per_sample=lambda o: o.log_softmax(-1)[..., 0].sum(-1)
    )
    frozen = WithBuffer().double()
    trainable = {k: v.detach() for k, v in frozen.named_parameters() if k.startswith("layer")}
    out["frozen_and_buffers"] = Case(
        lambda p, x: functional_call(frozen, p, (x,), strict=False).pow(2).sum(-1),
        trainable,
        (torch.randn(B, 4).double(),),
    )
    pure = {
        "layers": [{"w": torch.randn(4, 5), "b": torch.randn(5)}, torch.randn(5, 3)],
        "scale": torch.randn(3),
        "shift": torch.randn(1),
    }
    pure = torch.utils._pytree.tree_map(lambda t: t.double(), pure)
    out["pure_function"] = Case(_pure_fn, pure, (torch.randn(B, 4).double(),))
    out["gru"] = _module_case(
        nn.GRU(3, 4, batch_first=True),
        torch.randn(B, 5, 3),
        per_sample=lambda o: o[0].pow(2).sum((1, 2)),
    )
    out["lstm"] = _module_case(
        nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True, proj_size=2),
        torch.randn(B, 5, 3),
        per_sample=lambda o: (
            o[0].pow(2).sum((1, 2)) + o[1][1].sum((0, 2)) * 0 + o[1][0].pow(2).sum((0, 2)) * 0
        ),
    )
    out["rnn"] = _module_case(
        nn.RNN(3, 4, batch_first=True),
        torch.randn(B, 5, 3),
        per_sample=lambda o: o[0].pow(2).sum((1, 2)),
    )
    return out
