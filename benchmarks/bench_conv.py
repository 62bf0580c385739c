"""Times every form and kernel of a convolution weight's Gramian on the benchmark's layer shapes.

Run ``python benchmarks/bench_conv.py`` (``--repeats``, ``--threads``). For each layer (the
CIFAR-like CNN's and the ResNet-18's on 32x32 images, one output row per sample) it times, side
by side in one process, the Gramian of the per-sample weight gradients

- materialised, with the per-sample gradients from the unfolded patches (``patches``), from one
  grouped weight-gradient convolution with the samples as groups (``grouped``) or from one such
  convolution per sample (``rows``);
- in the ghost form, with the token similarities from the patches (``ghost``) or, for stride 1,
  from pixel similarities (``pixels``);

as a ratio to one weight-gradient convolution over the whole batch (what a training step spends
on that weight), and marks the form and kernel ``Conv`` chooses (``*``). A second table does the
same for the depthwise layers of MobileNetV3-small and ConvNeXt-atto (64x64 images): the grouped
kernel against ``depthwise`` (one forward convolution with the cotangents as kernels), the
batch's weight gradient and the JD direction by each. This is where the thresholds in
``torchgram._ops.conv_factor`` come from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _timing import layer_options, median_time

from torchgram._factors import DEFAULT_CHUNK_BYTES
from torchgram._ops.conv_factor import Conv

Tensor = torch.Tensor
# (name, batch, C_in, C_out, image size, stride)
LAYERS = [
    ("cnn conv1", 64, 3, 32, 32, 1),
    ("cnn conv2", 64, 32, 64, 16, 1),
    ("cnn conv3", 64, 64, 64, 8, 1),
    ("resnet 64", 32, 64, 64, 32, 1),
    ("resnet 64->128", 32, 64, 128, 32, 2),
    ("resnet 128", 32, 128, 128, 16, 1),
    ("resnet 256", 32, 256, 256, 8, 1),
    ("resnet 512", 32, 512, 512, 4, 1),
]
CHOICES = ("patches", "grouped", "rows", "ghost", "pixels")
# (name, batch, channels, image size, kernel, stride): depthwise, one input channel per group
DEPTHWISE_LAYERS = [
    ("mobilenet 16 3x3 s2", 32, 16, 32, 3, 2),
    ("mobilenet 72 3x3 s2", 32, 72, 16, 3, 2),
    ("mobilenet 96 5x5 s2", 32, 96, 8, 5, 2),
    ("mobilenet 240 5x5", 32, 240, 4, 5, 1),
    ("mobilenet 576 5x5", 32, 576, 2, 5, 1),
    ("convnext 40 7x7", 32, 40, 16, 7, 1),
    ("convnext 80 7x7", 32, 80, 8, 7, 1),
    ("convnext 160 7x7", 32, 160, 4, 7, 1),
    ("convnext 320 7x7", 32, 320, 2, 7, 1),
    ("3x3 on 16x16", 32, 64, 16, 3, 1),
]


def _materialised(factor: Conv, kernel: str) -> Callable[[], Tensor]:
    blocks = {
        "patches": factor._patch_blocks,
        "grouped": factor._grouped_blocks,
        "depthwise": factor._depthwise_blocks,
    }
    generate = blocks.get(kernel, factor._blocks)

    def run() -> Tensor:
        return sum(g @ g.T for g in generate(DEFAULT_CHUNK_BYTES))  # type: ignore[return-value]

    return run


def _row(name: str, B: int, c_in: int, c_out: int, size: int, stride: int, repeats: int) -> str:
    """One table row: the batch's weight gradient, then each form and kernel as a ratio to it."""
    x = torch.randn(B, 1, c_in, size, size)
    dy = torch.randn(1, B, 1, c_out, size // stride, size // stride)
    factor = Conv(None, x, dy, (3, 3), (stride, stride), (1, 1), (1, 1), 1)
    step = median_time(lambda: factor._weight_grad(dy[0, :, 0], x[:, 0], 1), repeats)
    patch_bytes = B * (size // stride) ** 2 * 9 * c_in * x.element_size()
    runs: dict[str, Callable[[], object] | None] = {
        "patches": _materialised(factor, "patches") if patch_bytes <= DEFAULT_CHUNK_BYTES else None,
        "grouped": _materialised(factor, "grouped"),
        "rows": _materialised(factor, "rows"),
        "ghost": lambda: factor._ghost(DEFAULT_CHUNK_BYTES, pixels=False),
        "pixels": (lambda: factor._ghost(DEFAULT_CHUNK_BYTES, pixels=True))
        if stride == 1
        else None,
    }
    form = factor.form()
    chosen = {"pixels": "pixels", "patches": "ghost"}.get(form) or factor.kernel_for_gradients(
        DEFAULT_CHUNK_BYTES
    )
    cells = []
    for choice in CHOICES:
        run = runs[choice]
        if run is None:
            cells.append("-")
            continue
        cell = f"{median_time(run, repeats) / step:.2f}x"
        cells.append(cell + " *" if choice == chosen else cell)
    return f"| {name} | {step * 1e3:.1f} | " + " | ".join(cells) + " |"


def _depthwise_row(
    name: str, B: int, C: int, size: int, kernel: int, stride: int, repeats: int
) -> str:
    """The depthwise layer's Gramian by the grouped and the depthwise kernels, and its JD
    direction (the weighted gradient) by the backend and as torchgram computes it."""
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    x = torch.randn(B, 1, C, size, size)
    dy = torch.randn(1, B, 1, C, out, out)
    pad = (kernel // 2,) * 2
    factor = Conv(None, x, dy, (kernel,) * 2, (stride,) * 2, pad, (1, 1), C)
    step = median_time(lambda: factor._weight_grad(dy[0, :, 0], x[:, 0], C), repeats)
    weights = torch.randn(1, B)
    cells = [
        median_time(_materialised(factor, kernel_name), repeats) / step
        for kernel_name in ("grouped", "depthwise")
    ]
    by_backend = median_time(
        lambda: factor._weight_grad(
            torch.einsum("b...,b->b...", dy[0, :, 0], weights[0]), x[:, 0], C
        ),
        repeats,
    )
    by_forward = median_time(lambda: factor.weighted(weights), repeats)
    chosen = factor.kernel_for_gradients(DEFAULT_CHUNK_BYTES)
    marks = [" *" if chosen == k else "" for k in ("grouped", "depthwise")]
    return (
        f"| {name} | {step * 1e3:.2f} | {cells[0]:.2f}x{marks[0]} | {cells[1]:.2f}x{marks[1]} "
        f"| {by_backend / step:.2f}x | {by_forward / step:.2f}x |"
    )


def main() -> None:
    args = layer_options(__doc__, repeats=5)
    print("| layer | weight gradient (ms) | " + " | ".join(CHOICES) + " |")
    print("|---|---:|" + "---:|" * len(CHOICES))
    for layer in LAYERS:
        print(_row(*layer, repeats=args.repeats), flush=True)
    print("\nCells: median time / median time of the batch's weight-gradient convolution; ")
    print("* the choice of Conv (form, then kernel); - not applicable (patches over the chunk, ")
    print("pixels with stride 2).")
    columns = ("grouped", "depthwise", "direction, backend", "direction, torchgram")
    print("\n| depthwise layer | weight gradient (ms) | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for layer in DEPTHWISE_LAYERS:
        print(_depthwise_row(*layer, repeats=args.repeats), flush=True)
    print("\nCells: median time / median time of the batch's weight-gradient convolution;")
    print("* the kernel Conv chooses (torchgram's direction takes the same kernel).")


if __name__ == "__main__":
    main()
