"""The architectures that ``bench_gramian.py`` times, each with its batch and per-sample losses.

``ARCHITECTURES`` maps a name to a function building a :class:`Setting`. One section per family:
the small models written to be fast (MLP, CNN, ResNet-18 with GroupNorm, a GPT-style LM, two
multi-task MLPs); transformers' GPT-2, BERT and Llama built from configs (no downloads; they need
``transformers``, imported lazily: :func:`missing` says what an architecture lacks); the stock
``nn.TransformerEncoder`` LM; vision models as people use them (MobileNetV3-small-like,
ConvNeXt-atto-like, ViT-tiny-like); an LSTM LM; and ``batch_dim=None`` variants with three
losses over the batch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class Setting:
    """One architecture with its batch.

    ``losses(model, *inputs)`` calls ``model`` (the module itself, or its functional form) as
    users call it and returns the losses: ``[B]`` or ``[B, K]`` with ``batch_dim=0``, ``[K]``
    with ``batch_dim=None``. Every tensor in ``inputs`` holds the samples on dim 0.
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    losses: Callable[..., Tensor]
    batch_dim: int | None = 0


def _classify(model: Callable[..., Any], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _next_token_losses(logits: Tensor, ids: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy per sequence, over the tokens ``keep`` marks (all if None)."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    if keep is None:
        return ce.mean(1)
    weights = keep[:, 1:].to(ce.dtype)
    return (ce * weights).sum(1) / weights.sum(1)


def _right_padded(batch: int, tokens: int, vocab: int) -> tuple[Tensor, Tensor]:
    """Token ids and a 2-D attention mask (1 = token, 0 = padding): a quarter of the samples
    are right-padded, by 8 to 40 tokens."""
    ids = torch.randint(0, vocab, (batch, tokens))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for i in range(1, batch, 4):
        mask[i, tokens - 8 * (1 + i % 5) :] = 0
    return ids, mask


# The small models written to be fast -----------------------------------------------------------


def _mlp() -> Setting:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )  # fmt: skip
    return Setting(model, (torch.randn(64, 784), torch.randint(0, 10, (64,))), _classify)


def _cnn() -> Setting:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    x = torch.randn(64, 3, 32, 32)
    return Setting(model, (x, torch.randint(0, 10, (64,))), _classify)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(8, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


def _resnet18() -> Setting:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(8, 64)]
    layers.append(nn.ReLU())
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(c_in, c_out, stride), _Block(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    model = nn.Sequential(*layers)
    x = torch.randn(32, 3, 32, 32)
    return Setting(model, (x, torch.randint(0, 10, (32,))), _classify)


class _Positions(nn.Module):
    """Learned position embeddings, added (a module of its own so that TorchJD can hook it)."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(tokens, width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.weight[: h.shape[-2]]


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        B, T, width = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(B, T, width))


class _TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = _Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class _LanguageModel(nn.Module):
    """A GPT-style causal language model (pre-norm blocks)."""

    def __init__(self, vocab: int = 512, width: int = 256, tokens: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = _Positions(tokens, width)
        self.blocks = nn.Sequential(*(_TransformerBlock(width, 4) for _ in range(2)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.blocks(self.position(self.embed(tokens)))
        return self.head(self.norm(h))


def _sequence_losses(model: Callable[..., Any], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(-1)


def _transformer() -> Setting:
    x, y = torch.randint(0, 512, (32, 64)), torch.randint(0, 512, (32, 64))
    return Setting(_LanguageModel(), (x, y), _sequence_losses)


class _MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=-1)  # [B, 2]


def _task_losses(model: Callable[..., Any], x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y) ** 2  # [B, 2]


def _batch_task_losses(model: Callable[..., Any], x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(0)  # [2]: one loss per task over the batch


def _instance_wise() -> Setting:
    return Setting(_MultiTask(), (torch.randn(64, 784), torch.randn(64, 2)), _task_losses)


def _multi_task() -> Setting:
    x, y = torch.randn(64, 784), torch.randn(64, 2)
    return Setting(_MultiTask(), (x, y), _batch_task_losses, None)


# transformers' models, built from configs ------------------------------------------------------

_HF_SIZES = {  # layers, hidden, heads, vocabulary, batch
    "tiny": (2, 64, 2, 1000, 32),
    "small": (4, 256, 4, 5000, 16),
}
_HF_TOKENS = 64


def _attention(implementation: str) -> dict[str, Any]:
    return {"attn_implementation": implementation}  # a config keyword, not in their signatures


def _hf_lm_losses(model: Callable[..., Any], ids: Tensor, mask: Tensor) -> Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return _next_token_losses(logits, ids, mask)


def _hf_classify(model: Callable[..., Any], ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits, labels, reduction="none")


def _gpt2(size: str) -> Setting:
    import transformers

    layers, hidden, heads, vocab, batch = _HF_SIZES[size]
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=_HF_TOKENS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_attention("eager"),
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()  # input and output embeddings tied
    return Setting(model, _right_padded(batch, _HF_TOKENS, vocab), _hf_lm_losses)


def _bert(size: str) -> Setting:
    import transformers

    layers, hidden, heads, vocab, batch = _HF_SIZES[size]
    config = transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=_HF_TOKENS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_attention("sdpa"),
    )  # fmt: skip
    config.num_labels = 3
    model = transformers.BertForSequenceClassification(config).eval()
    ids, mask = _right_padded(batch, _HF_TOKENS, vocab)
    return Setting(model, (ids, mask, torch.randint(0, 3, (batch,))), _hf_classify)


def _llama(size: str) -> Setting:
    import transformers

    layers, hidden, heads, vocab, batch = _HF_SIZES[size]
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=heads // 2, intermediate_size=8 * hidden // 3, vocab_size=vocab,
        max_position_embeddings=_HF_TOKENS, **_attention("sdpa"),
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    return Setting(model, _right_padded(batch, _HF_TOKENS, vocab), _hf_lm_losses)


# The stock nn.TransformerEncoder ---------------------------------------------------------------


class _EncoderLM(nn.Module):
    """A causal LM on ``nn.TransformerEncoder`` (``F.multi_head_attention_forward`` inside),
    with a causal mask and ``src_key_padding_mask``."""

    def __init__(self, vocab: int = 1000, width: int = 256, tokens: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = _Positions(tokens, width)
        layer = nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        tokens = ids.shape[-1]
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=ids.device).triu(1)
        h = self.position(self.embed(ids))
        return self.head(self.encoder(h, mask=causal, src_key_padding_mask=padding))


def _encoder_losses(model: Callable[..., Any], ids: Tensor, padding: Tensor) -> Tensor:
    return _next_token_losses(model(ids, padding), ids, ~padding)


def _encoder_lm() -> Setting:
    ids, mask = _right_padded(32, 64, 1000)
    return Setting(_EncoderLM(), (ids, mask == 0), _encoder_losses)


# Vision models ---------------------------------------------------------------------------------


def _divisible(channels: float, by: int = 8) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of ``by``, at least 90% of it."""
    rounded = max(by, int(channels + by / 2) // by * by)
    return rounded + by if rounded < 0.9 * channels else rounded


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels // 4)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        return x * F.hardsigmoid(scale)


class _InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expansion, depthwise conv, squeeze-excitation, 1x1 projection."""

    def __init__(
        self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, hs: bool, stride: int
    ) -> None:
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers += [nn.Conv2d(c_in, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act()]
        layers += [
            nn.Conv2d(expanded, expanded, kernel, stride, kernel // 2, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            act(),
        ]
        if se:
            layers.append(_SqueezeExcite(expanded))
        layers += [nn.Conv2d(expanded, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.residual else out


_MOBILENET_V3_SMALL = (  # in, kernel, expanded, out, squeeze-excitation, hardswish, stride
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)


def _mobilenet_v3() -> Setting:
    """torchvision's MobileNetV3-small (10 classes) on 64x64 images, BatchNorm in eval mode."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
        *(_InvertedResidual(*row) for row in _MOBILENET_V3_SMALL),
        nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, 10),
    ]  # fmt: skip
    model = nn.Sequential(*layers)
    with torch.no_grad():  # running statistics as after training, not the identity
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    x = torch.randn(32, 3, 64, 64)
    return Setting(model.eval(), (x, torch.randint(0, 10, (32,))), _classify)


class _ChannelsLast(nn.Module):
    """Runs ``module`` on ``[B, H, W, C]``: ConvNeXt's LayerNorm over channels of a feature map."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _LayerScale(nn.Module):
    """A learned per-channel scale (a module of its own so that TorchJD can hook it)."""

    def __init__(self, width: int, init: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _ConvNeXtBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.scale = _LayerScale(width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)  # channels last
        h = self.scale(self.mlp(self.norm(h)))
        return x + h.permute(0, 3, 1, 2)


def _convnext_atto() -> Setting:
    """timm's ConvNeXt-atto (widths 40-320, depths 2-2-6-2, 10 classes) on 64x64 images."""
    widths, depths = (40, 80, 160, 320), (2, 2, 6, 2)
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 4, 4),
        _ChannelsLast(nn.LayerNorm(widths[0], eps=1e-6)),
    ]
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        if stage > 0:
            layers += [
                _ChannelsLast(nn.LayerNorm(widths[stage - 1], eps=1e-6)),
                nn.Conv2d(widths[stage - 1], width, 2, 2),
            ]
        layers += [_ConvNeXtBlock(width) for _ in range(depth)]
    layers += [
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(widths[-1], eps=1e-6),
        nn.Linear(widths[-1], 10),
    ]  # fmt: skip
    x = torch.randn(32, 3, 64, 64)
    return Setting(nn.Sequential(*layers), (x, torch.randint(0, 10, (32,))), _classify)


class _ClassToken(nn.Module):
    """Prepends the class token and adds position embeddings (a module of its own so that
    TorchJD can hook it)."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([self.token.expand(h.shape[0], -1, -1), h], dim=1) + self.position


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        normed = self.norm1(h)
        h = h + self.attention(normed, normed, normed, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class _ViT(nn.Module):
    """ViT-tiny-like: patch-8 conv embedding, class token, 2 pre-norm blocks (width 192, 3
    heads) of ``nn.MultiheadAttention``, the head on the class token."""

    def __init__(self, image: int = 32, patch: int = 8, width: int = 192) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, patch, patch)
        self.tokens = _ClassToken((image // patch) ** 2, width)
        self.blocks = nn.Sequential(*(_ViTBlock(width, 3) for _ in range(2)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(self.patches(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(self.blocks(h))[:, 0])


def _vit_tiny() -> Setting:
    x = torch.randn(32, 3, 32, 32)
    return Setting(_ViT(), (x, torch.randint(0, 10, (32,))), _classify)


# Recurrent -------------------------------------------------------------------------------------


class _LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 1000, embedding: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


def _lstm_losses(model: Callable[..., Any], ids: Tensor) -> Tensor:
    return _next_token_losses(model(ids), ids)


def _lstm_lm() -> Setting:
    return Setting(_LSTMLanguageModel(), (torch.randint(0, 1000, (32, 32)),), _lstm_losses)


# batch_dim=None with three losses over the batch -----------------------------------------------


def _in_thirds(make: Callable[[], Setting]) -> Callable[[], Setting]:
    """The same model and batch, with three losses: the mean loss over each third of the batch
    (``batch_dim=None``: every loss depends on several samples)."""

    def thirds() -> Setting:
        setting = make()

        def losses(model: Callable[..., Any], *inputs: Tensor) -> Tensor:
            parts = setting.losses(model, *inputs).tensor_split(3)
            return torch.stack([part.mean() for part in parts])  # [3]

        return Setting(setting.model, setting.inputs, losses, None)

    return thirds


# The registry ----------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[[], Setting]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18-gn": _resnet18,
    "transformer-lm": _transformer,
    "iwmtl": _instance_wise,
    "mtl-batch-none": _multi_task,
    "gpt2-tiny": lambda: _gpt2("tiny"),
    "gpt2-small": lambda: _gpt2("small"),
    "bert-tiny": lambda: _bert("tiny"),
    "bert-small": lambda: _bert("small"),
    "llama-tiny": lambda: _llama("tiny"),
    "llama-small": lambda: _llama("small"),
    "encoder-lm": _encoder_lm,
    "mobilenetv3-small": _mobilenet_v3,
    "convnext-atto": _convnext_atto,
    "vit-tiny": _vit_tiny,
    "lstm-lm": _lstm_lm,
    "gpt2-tiny-k3": _in_thirds(lambda: _gpt2("tiny")),
    "lstm-lm-k3": _in_thirds(_lstm_lm),
    "convnext-atto-k3": _in_thirds(_convnext_atto),
}


def missing(arch: str) -> str | None:
    """Why ``arch`` cannot be built here (an optional package it needs is missing), or None."""
    if arch.split("-")[0] in ("gpt2", "bert", "llama"):
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed (pip install transformers)"
    return None
