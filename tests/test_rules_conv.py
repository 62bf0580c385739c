"""The convolution rule: exact for every stride, padding, dilation and group count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian
from rule_check import check_exact, rule_counts
from torch import nn
from torch.func import functional_call

import torchgram
import torchgram._assemble as assemble

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


@pytest.mark.parametrize("form", ["patches", "pixels", "materialised"])
@pytest.mark.parametrize("chunk", [1, 2**11, 2**30])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_form_in_blocks(monkeypatch, form, chunk, groups, rows, stride) -> None:
    """Each form, with blocks of one output channel (or group, or sample) up to the whole
    weight, and with one or two output rows per sample (the blocks then hold K*B rows)."""
    _force_form(monkeypatch, form)
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1, stride=stride, groups=groups).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)

    def fn(params, x):
        h = functional_call(layer, params, (x,)).flatten(1)
        return torch.stack([h.pow(2).sum(-1), h.sin().sum(-1)][:rows], dim=-1)  # [B, rows]

    check_exact(monkeypatch, fn, params, x, max_chunk_bytes=chunk)


def test_pixel_form_blocks_stay_within_the_chunk() -> None:
    """The pixel form builds, for each block of samples, the products of every pair of input
    pixels: with 'valid' padding a sample has many more pixels than output positions, so the
    blocks are sized by the pixels too, and nothing it builds exceeds ``max_chunk_bytes``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from torchgram._ops.conv_factor import Conv

    torch.manual_seed(0)
    D = torch.float64
    x = torch.randn(4, 1, 2, 12, 12, dtype=D)  # [B, N, C_in, H, W]: 145 pixels with the zero
    dy = torch.randn(1, 4, 1, 3, 8, 8, dtype=D)  # kernel 5, no padding: 64 output positions
    conv = Conv(None, x, dy, (5, 5), (1, 1), (0, 0), (1, 1), 1)
    chunk = 2**18  # room for two samples a side by the output positions alone

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.nbytes = max(self.nbytes, t.numel() * t.element_size())
            return out

    with Largest() as largest:
        G = conv._ghost(chunk, pixels=True)
    assert largest.nbytes <= chunk
    assert torch.allclose(G, conv._ghost(2**30, pixels=False), rtol=1e-10)


def _force_form(monkeypatch, form: str | bool) -> None:
    """Force the conv factors' form: ``"patches"``, ``"pixels"`` (ghost forms; pixels need
    stride 1, patches are used otherwise) or ``"materialised"``; True or False for ghost on
    patches or materialised."""
    from torchgram._ops.conv_factor import Conv

    if isinstance(form, bool):
        form = "patches" if form else "materialised"

    def forced(self):
        if form == "pixels" and any(s != 1 for s in self.stride):
            return "patches"
        return form

    monkeypatch.setattr(Conv, "form", forced)


def _count_blocks(monkeypatch, method: str) -> list[int]:
    """Wraps ``Conv.<method>`` (a generator of blocks): one entry per call, its number of blocks."""
    from torchgram._ops.conv_factor import Conv

    original = getattr(Conv, method)
    counts: list[int] = []

    def counting(self, *args, **kwargs):
        counts.append(0)
        for block in original(self, *args, **kwargs):
            counts[-1] += 1
            yield block

    monkeypatch.setattr(Conv, method, counting)
    return counts


FORMS = pytest.mark.parametrize("ghost", ["patches", "pixels", "materialised"])
KERNELS = pytest.mark.parametrize("kernel", ["patches", "grouped", "rows"])
GENERATORS = {"patches": "_patch_blocks", "grouped": "_grouped_blocks", "rows": "_blocks"}


def _force_kernel(monkeypatch, kernel: str) -> None:
    """The materialised form builds per-sample gradients with ``kernel`` (patches need G = 1,
    depthwise one input channel per group)."""
    from torchgram._ops.conv_factor import Conv

    choose = Conv.kernel_for_gradients

    def forced(self, chunk_bytes):
        fits = {"patches": self.groups == 1, "depthwise": self.x.shape[2] == self.groups}
        return kernel if fits.get(kernel, True) else choose(self, chunk_bytes)

    monkeypatch.setattr(Conv, "kernel_for_gradients", forced)


@FORMS
@KERNELS
@pytest.mark.parametrize(
    ("n", "conv"),
    [
        (1, {"kernel_size": 2}),
        (1, {"kernel_size": 4, "dilation": 3}),
        (2, {"kernel_size": (2, 3)}),
        (2, {"kernel_size": (2, 4), "dilation": (3, 1)}),
        (3, {"kernel_size": (2, 1, 2)}),
    ],
    ids=["1d-k2", "1d-k4-dil3", "2d-k23", "2d-k24-dil31", "3d-k212"],
)
def test_uneven_same_padding(monkeypatch, ghost, kernel, n, conv) -> None:
    """An odd total of 'same' padding puts the extra element on the right (as torch does)."""
    _force_form(monkeypatch, ghost)
    _force_kernel(monkeypatch, kernel)
    fn, params, x = _case(n, size=4 if n == 3 else 5, padding="same", **conv)
    check_exact(monkeypatch, fn, params, x)
    assert rule_counts(fn, params, x) == {(f"conv{n}d", f"conv{n}d"): 1}


@FORMS
@KERNELS
@pytest.mark.parametrize(
    ("n", "conv"),
    [
        (1, {"kernel_size": 3, "stride": 3, "dilation": 2, "padding": 2}),
        (2, {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 1}),
        (2, {"kernel_size": 3, "stride": (2, 1), "dilation": (1, 2), "padding": (0, 2)}),
        (2, {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 2, "groups": 2}),
        (3, {"kernel_size": 2, "stride": 2, "dilation": 2, "padding": 1}),
    ],
    ids=["1d", "2d", "2d-per-dim", "2d-groups", "3d"],
)
def test_dilation_with_stride(monkeypatch, ghost, kernel, n, conv) -> None:
    _force_form(monkeypatch, ghost)
    _force_kernel(monkeypatch, kernel)
    fn, params, x = _case(n, size=5 if n == 3 else 7, **conv)
    check_exact(monkeypatch, fn, params, x)
    assert rule_counts(fn, params, x) == {(f"conv{n}d", f"conv{n}d"): 1}


def _rows_fn(layer: nn.Module, rows: int):
    def fn(params, x):
        h = functional_call(layer, params, (x,)).flatten(1)
        return torch.stack([h.pow(2).sum(-1), h.sin().sum(-1)][:rows], dim=-1)  # [B, rows]

    return fn


@pytest.mark.parametrize("rows", [1, 2])
def test_patches_fit_but_gradients_come_in_several_blocks(monkeypatch, rows) -> None:
    """Patches of 3 * 9 * 36 * 8 = 7776 bytes fit in 12000, gradients of 864 * rows bytes per
    output channel do not: blocks of 13 (one row) or 6 (two rows) of the 16 channels."""
    _force_form(monkeypatch, False)
    _force_kernel(monkeypatch, "patches")
    patch_blocks = _count_blocks(monkeypatch, "_patch_blocks")
    kernel_blocks = _count_blocks(monkeypatch, "_blocks")
    layer = nn.Conv2d(4, 16, 3, padding=1).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    check_exact(monkeypatch, _rows_fn(layer, rows), params, x, max_chunk_bytes=12000)
    assert patch_blocks and all(count > 1 for count in patch_blocks), patch_blocks
    assert not kernel_blocks


@pytest.mark.parametrize("kernel", ["grouped", "rows"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "chunk"),
    [
        (8, 8, 4, 1),  # one group per block
        (8, 8, 4, 1800),  # two groups per block (with one row)
        (8, 12, 4, 2200),  # 5 channels fit: a block rounds down to one group of 3
        (8, 12, 4, 4000),  # 9 then 3 channels: the last block is smaller
        (6, 6, 6, 1000),  # 4 then 2 groups of one channel
    ],
)
def test_groups_in_blocks_of_whole_groups(
    monkeypatch, kernel, rows, c_in, c_out, groups, chunk
) -> None:
    _force_form(monkeypatch, False)
    _force_kernel(monkeypatch, kernel)
    kernel_blocks = _count_blocks(monkeypatch, GENERATORS[kernel])
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, c_in, 4, 4, dtype=torch.float64)
    check_exact(monkeypatch, _rows_fn(layer, rows), params, x, max_chunk_bytes=chunk)
    assert kernel_blocks and all(count > 1 for count in kernel_blocks), kernel_blocks


@pytest.mark.parametrize(
    ("kernel", "groups"),  # patches need G = 1
    [("patches", 1), ("grouped", 1), ("grouped", 2), ("rows", 1), ("rows", 2)],
)
@pytest.mark.parametrize("chunk", [1, 2**11, 2**30])
def test_overlapping_regions_are_materialised(monkeypatch, kernel, chunk, groups) -> None:
    """A weight and its first half in two convolutions: the regions overlap, so each factor is
    materialised (``Conv.materialise``) and scattered into the leaf, whatever the chunk size."""
    _force_kernel(monkeypatch, kernel)
    kernel_blocks = _count_blocks(monkeypatch, GENERATORS[kernel])
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def fn(params, x):
        w = params["w"]
        h = torch.tanh(F.conv2d(x, w, padding=1, groups=groups))
        return F.conv2d(h, w[:2], stride=2, groups=groups).pow(2).sum((-1, -2, -3))

    check_exact(monkeypatch, fn, {"w": w}, x, max_chunk_bytes=chunk)
    assert rule_counts(fn, {"w": w}, x) == {("conv2d", "conv2d"): 2}
    # both factors materialised, in each of check_exact's two runs
    assert len(kernel_blocks) == 4, kernel_blocks


@pytest.mark.parametrize("padding", [1, "same"])
def test_conv_and_elementwise_use_on_one_region(monkeypatch, padding) -> None:
    """A conv weight also scaled elementwise: the two factors are summed by materialising."""
    w = torch.randn(4, 4, 2, 3, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def fn(params, x):
        w = params["w"]
        conv = F.conv2d(x, w, padding=padding).pow(2).sum((-1, -2, -3))
        return conv + torch.tanh(x[:, None, :, :2, :3] * w).sum((-1, -2, -3, -4))

    check_exact(monkeypatch, fn, {"w": w}, x)
    assert rule_counts(fn, {"w": w}, x) == {("conv2d", "conv2d"): 1, ("mul", "parameters"): 1}


DEPTHWISE = pytest.mark.parametrize(
    ("n", "multiplier", "conv"),
    [
        (2, 1, {"kernel_size": 5, "padding": 2}),
        (2, 2, {"kernel_size": 7, "stride": 2, "padding": 3}),
        (2, 3, {"kernel_size": (3, 5), "stride": (2, 1), "dilation": (1, 2), "padding": (1, 2)}),
        (1, 1, {"kernel_size": 4, "dilation": 2, "padding": "same"}),
        (3, 1, {"kernel_size": 3, "dilation": 2, "padding": 1}),
        (2, 1, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}),
    ],
    ids=["5x5", "7x7-stride-multiplier", "per-dim", "1d-same", "3d-dilated", "3x3-reflect"],
)


def _depthwise_case(n: int, multiplier: int, conv: dict, rows: int):
    torch.manual_seed(0)
    layer = CONVS[n](4, 4 * multiplier, groups=4, **conv).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 4, *(4 if n == 3 else 6,) * n, dtype=torch.float64)
    return _rows_fn(layer, rows), params, x


@DEPTHWISE
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("chunk", [1, 2**30])
def test_depthwise_gradients_by_forward_convolution(
    monkeypatch, n, multiplier, conv, rows, chunk
) -> None:
    """Per-sample gradients of a depthwise weight from one forward convolution with the
    cotangents as kernels: exact for strides, dilations, channel multipliers, several rows and
    blocks of one group (``chunk=1``), and the JD direction by the same kernel."""
    _force_form(monkeypatch, "materialised")
    _force_kernel(monkeypatch, "depthwise")
    monkeypatch.setattr(assemble, "_REUSE_GAIN", 0)  # kept whenever within the chunk
    blocks = _count_blocks(monkeypatch, "_depthwise_blocks")
    fn, params, x = _depthwise_case(n, multiplier, conv, rows)
    check_exact(monkeypatch, fn, params, x, max_chunk_bytes=chunk)
    # The Gramian in blocks of one group when chunk=1 (none kept: over the budget), then the
    # direction in one block; else in one block, kept for the direction. Then check_exact's
    # run that keeps none.
    assert blocks == ([4, 1] if chunk == 1 else [1]) + [4 if chunk == 1 else 1, 1], blocks


@DEPTHWISE
def test_depthwise_kernel_differentiable_and_several_images(monkeypatch, n, multiplier, conv):
    """With ``batch_dim=None`` each row's sample holds the whole batch as its images; and a
    Gramian differentiated through the forward-convolution kernel."""
    _force_form(monkeypatch, "materialised")
    _force_kernel(monkeypatch, "depthwise")
    blocks = _count_blocks(monkeypatch, "_depthwise_blocks")
    fn, params, x = _depthwise_case(n, multiplier, conv, rows=2)

    def summed(params, x):
        return fn(params, x).sum(0)  # [2] rows over the batch

    check_exact(monkeypatch, summed, params, x, batch_dim=None)
    assert blocks

    def trace(p):
        return torchgram.flatten(torchgram.gramian(fn, p, x, batch_dim=0)).trace()

    ours = torch.func.grad(trace)(params)
    expected = torch.func.grad(lambda p: flat_gramian(fn, p, x).trace())(params)
    for name in params:
        assert torch.allclose(ours[name], expected[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("n", "kernel", "dilation", "size", "expected"),
    [
        (2, 5, 1, 8, "depthwise"),  # 5 x 5: the backend's kernel is slow
        (2, 7, 1, 16, "depthwise"),
        (1, 3, 2, 16, "depthwise"),  # dilated
        (2, 3, 1, 2, "depthwise"),  # 3 x 3 over 2 x 2 outputs
        (2, 3, 1, 8, "grouped"),  # 3 x 3: the backend's fast kernel
    ],
)
def test_depthwise_kernel_choice(n, kernel, dilation, size, expected) -> None:
    from torchgram._ops.conv_factor import Conv

    x = torch.zeros(8, 1, 16, *(size,) * n)
    dy = torch.zeros(1, 8, 1, 16, *(size,) * n)
    pad = dilation * (kernel // 2)
    factor = Conv(None, x, dy, (kernel,) * n, (1,) * n, (pad,) * n, (dilation,) * n, 16)
    assert factor.kernel_for_gradients(2**30) == expected


@pytest.mark.parametrize(
    ("batch", "c_in", "c_out", "size", "groups", "chunk", "expected"),
    [
        (8, 3, 32, 8, 1, 2**30, "patches"),  # few input channels, patches fit
        (8, 3, 32, 8, 1, 1, "grouped"),  # patches do not fit
        (8, 32, 64, 8, 1, 2**30, "grouped"),  # 32 x 64 channels
        (8, 256, 256, 4, 1, 2**30, "patches"),  # many channels, patches fit
        (8, 256, 256, 4, 1, 1, "rows"),
        (8, 512, 512, 4, 2, 2**30, "rows"),  # 256 x 256 per group: no patches with groups
        (8, 512, 512, 4, 8, 2**30, "grouped"),  # 64 x 64 per group
    ],
)
def test_kernel_for_gradients(batch, c_in, c_out, size, groups, chunk, expected) -> None:
    from torchgram._ops.conv_factor import Conv

    x = torch.zeros(batch, 1, c_in, size, size)
    dy = torch.zeros(1, batch, 1, c_out, size, size)
    factor = Conv(None, x, dy, (3, 3), (1, 1), (1, 1), (1, 1), groups)
    assert factor.kernel_for_gradients(chunk) == expected


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_pixel_similarities_with_dilation_padding_and_several_images(
    monkeypatch, batch_dim, n
) -> None:
    """The pixel form, stride 1: with ``batch_dim=None`` every sample holds N images (one per
    row of the batch), each with its own zero pixel for the padding."""
    from torchgram._ops.conv_factor import Conv

    _force_form(monkeypatch, "pixels")
    calls = []
    similarity = Conv._pixel_similarity
    monkeypatch.setattr(
        Conv, "_pixel_similarity", lambda self, *a: calls.append(1) or similarity(self, *a)
    )
    torch.manual_seed(0)
    layer = CONVS[n](4, 6, kernel_size=3, padding=2, dilation=2).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 4, *(4 if n == 3 else 6,) * n, dtype=torch.float64)
    check_exact(monkeypatch, _rows_fn(layer, 2), params, x, batch_dim=batch_dim)
    assert calls


@pytest.mark.parametrize(
    ("batch", "channels", "size", "stride", "expected"),
    [
        (32, 512, 4, 1, "pixels"),  # late ResNet layers: 9x fewer similarity products
        (32, 256, 8, 1, "materialised"),  # the pixel gathers cost more than they save
        (32, 512, 4, 2, "patches"),  # stride 2: no pixel form
        (64, 32, 16, 1, "materialised"),
    ],
)
def test_form_by_cost(batch, channels, size, stride, expected) -> None:
    from torchgram._ops.conv_factor import Conv

    x = torch.zeros(batch, 1, channels, size, size)
    dy = torch.zeros(1, batch, 1, channels, size // stride, size // stride)
    factor = Conv(None, x, dy, (3, 3), (stride, stride), (1, 1), (1, 1), 1)
    assert factor.form() == expected


def test_channels_last_input_without_batch_dim() -> None:
    """An input with channels-last strides (after a permute, as ConvNeXt's downsampling): the
    weight gradient comes back channels-last too. Exact."""
    conv = torch.nn.Conv2d(4, 6, 2, 2).double()
    params = {k: v.detach() for k, v in conv.named_parameters()}
    x = torch.randn(6, 8, 8, 4, dtype=torch.float64).permute(0, 3, 1, 2)

    def fn(p, x):
        out = torch.func.functional_call(conv, p, (x,)).pow(2).mean((1, 2, 3))
        return torch.stack([t.mean() for t in out.tensor_split(3)])

    G = torchgram.gramian(fn, params, x)
    assert torch.allclose(G, flat_gramian(fn, params, x), rtol=1e-10)
