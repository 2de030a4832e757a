"""``python -m cupydcn demo``: train a tiny deformable network with cupydcn's explicit
forward and backward, then show where it learned to sample.

The task: each 32 x 32 image holds a pair of dots, side by side or one above the other
(within +-15 degrees); say which. The pair's size varies four-fold (separation 6 to 22
pixels, dot radius 15 % of it), so the evidence — the other dot — lies at a distance
that grows with the object. Each dot alone is round and says nothing about the
orientation, so a unit must see both dots.

The network (every layer's backward written out here, the deformable one's from
``cupydcn.deform_conv2d_backward``)::

    image [N, 1, 32, 32]
      -> conv 3x3 (8) -> ReLU -> 2x2 average pool -> conv 3x3 (16) -> ReLU
         = features [N, 16, 16, 16]
      -> offsets = conv 3x3 (18) of the features, zero-initialised (so it starts as a
         regular 3 x 3 conv, as in the DCN paper)
      -> cupydcn.deform_conv2d 3x3 (32), padding 1 -> ReLU -> global average -> linear (2)

The plain convolutions have no bias, so the background's features are exactly zero, like
the deformable layer's zero padding. The features' receptive field is 8 pixels wide; a
regular 3 x 3 layer on top sees 12 pixels, enough to span the gap between small pairs'
dots but not between large pairs'. Loss: softmax cross-entropy plus a small L2 penalty
on the offsets (they grow only as far as the task needs). Optimiser: Adam with a cosine
learning-rate decay, a few lines on the arrays. Everything runs in the array library at hand: NumPy (CPU), or CuPy with
``--device cuda``; cupydcn computes where the arrays live.

Reported: test loss and accuracy before and after training, and the effective dilation
(:func:`cupydcn.effective_dilation`, the mean distance between adjacent taps' sampling
locations; 1.00 = a regular 3 x 3 conv) averaged over the cells on the dots, by pair
size. The picture shows the learned sampling locations of the cells on the dots of test
images, small and large, and the effective dilation against the pair's separation.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import numpy as np

from cupydcn.cli.options import fail, non_negative_int, positive_int, unwritable_reason
from cupydcn.cli.probe import cuda_device_count
from cupydcn.core.threads import blas_threads_for
from cupydcn.deform_conv import deform_conv2d, deform_conv2d_backward
from cupydcn.deform_conv.sampling import effective_dilation

IMAGE = 32
FEATURE = IMAGE // 2  # the deformable layer's grid (after the 2 x 2 pool)
SEPARATION = (6.0, 22.0)  # pixels between the dot centres
DOT_RADIUS = 0.15  # times the separation
SIZE_BINS = (6.0, 10.0, 14.0, 18.0, 22.0)
CHANNELS = (8, 16, 32)
OFFSET_PENALTY = 0.01  # times the mean squared offset
TEST_IMAGES = 512


# ---------------------------------------------------------------------------- data


def make_pairs(rng: np.random.Generator, n: int, *, supersample: int = 4):
    """``n`` anti-aliased images [n, 1, 32, 32] float32 of a pair of dots; labels [n]
    (0: side by side, 1: one above the other), separations [n] (pixels) and dot centres
    [n, 2, 2] ((y, x) of each dot, pixels)."""
    separation = rng.uniform(*SEPARATION, n)
    label = rng.integers(0, 2, n)
    angle = np.where(label == 1, np.pi / 2, 0.0) + rng.uniform(-np.pi / 12, np.pi / 12, n)
    radius = DOT_RADIUS * separation
    half_y = np.abs(np.sin(angle)) * separation / 2 + radius + 1
    half_x = np.abs(np.cos(angle)) * separation / 2 + radius + 1
    cy = rng.uniform(half_y, IMAGE - half_y)
    cx = rng.uniform(half_x, IMAGE - half_x)
    centres = np.stack(
        [
            np.stack(
                [cy - s * np.sin(angle) * separation / 2, cx - s * np.cos(angle) * separation / 2],
                axis=1,
            )
            for s in (1, -1)
        ],
        axis=1,
    )
    grid = (np.arange(IMAGE * supersample) + 0.5) / supersample
    inside = np.zeros((n, IMAGE * supersample, IMAGE * supersample), bool)
    for dot in range(2):
        dy = grid[None, :, None] - centres[:, dot, 0, None, None]
        dx = grid[None, None, :] - centres[:, dot, 1, None, None]
        inside |= dy * dy + dx * dx <= (radius * radius)[:, None, None]
    images = inside.reshape(n, IMAGE, supersample, IMAGE, supersample).mean(axis=(2, 4))
    return images[:, None].astype(np.float32), label, separation, centres


# ---------------------------------------------------------------------------- layers


def _conv(xp, x, weight):
    """3 x 3 convolution, stride 1, padding 1, no bias, through im2col: (output, columns)."""
    n, c, h, w = x.shape
    out_channels = weight.shape[0]
    padded = xp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    columns = xp.stack(
        [padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2
    ).reshape(n, c * 9, h * w)
    output = xp.matmul(weight.reshape(out_channels, c * 9), columns)
    return output.reshape(n, out_channels, h, w), columns


def _conv_backward(xp, grad, columns, weight, input_shape, need_input=True):
    """Gradients of :func:`_conv`: (grad_input or None, grad_weight)."""
    n, out_channels, h, w = grad.shape
    c = input_shape[1]
    grad = grad.reshape(n, out_channels, h * w)
    grad_weight = xp.matmul(grad, columns.transpose(0, 2, 1)).sum(axis=0).reshape(weight.shape)
    if not need_input:
        return None, grad_weight
    grad_columns = xp.matmul(weight.reshape(out_channels, c * 9).T, grad).reshape(n, c, 9, h, w)
    grad_padded = xp.zeros((n, c, h + 2, w + 2), dtype=grad.dtype)
    for i in range(3):
        for j in range(3):
            grad_padded[:, :, i : i + h, j : j + w] += grad_columns[:, :, i * 3 + j]
    return grad_padded[:, :, 1:-1, 1:-1], grad_weight


def init_params(xp, rng: np.random.Generator) -> dict:
    c1, c2, c3 = CHANNELS

    def he(*shape):
        return rng.standard_normal(shape) * math.sqrt(2.0 / np.prod(shape[1:]))

    params = dict(
        conv1=he(c1, 1, 3, 3),
        conv2=he(c2, c1, 3, 3),
        offset_weight=np.zeros((18, c2, 3, 3)),
        offset_bias=np.zeros(18),
        deform_weight=he(c3, c2, 3, 3),
        deform_bias=np.zeros(c3),
        fc_weight=0.1 * rng.standard_normal((2, c3)),
        fc_bias=np.zeros(2),
    )
    return {name: xp.asarray(value, dtype=xp.float32) for name, value in params.items()}


def forward(xp, params, images, *, offsets_enabled=True):
    """Logits [N, 2] and everything the backward pass needs."""
    h1, columns1 = _conv(xp, images, params["conv1"])
    a1 = xp.maximum(h1, 0)
    n, c, h, w = a1.shape
    pooled = a1.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
    h2, columns2 = _conv(xp, pooled, params["conv2"])
    features = xp.maximum(h2, 0)
    offsets, offset_columns = _conv(xp, features, params["offset_weight"])
    offsets = offsets + params["offset_bias"][:, None, None]
    if not offsets_enabled:
        offsets = xp.zeros_like(offsets)
    h3 = deform_conv2d(features, offsets, params["deform_weight"], params["deform_bias"], padding=1)
    a3 = xp.maximum(h3, 0)
    pooled3 = a3.mean(axis=(2, 3))
    logits = pooled3 @ params["fc_weight"].T + params["fc_bias"]
    cache = dict(
        images=images,
        h1=h1,
        columns1=columns1,
        pooled=pooled,
        h2=h2,
        columns2=columns2,
        features=features,
        offsets=offsets,
        offset_columns=offset_columns,
        h3=h3,
        pooled3=pooled3,
    )
    return logits, cache


def loss_and_grad(xp, logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = xp.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    rows = xp.arange(labels.shape[0])
    loss = -xp.log(probabilities[rows, labels] + 1e-12).mean()
    grad = probabilities.copy()
    grad[rows, labels] -= 1
    return loss, grad / labels.shape[0]


def backward(xp, params, cache, grad_logits, *, offsets_enabled=True):
    """Gradients of (cross-entropy + offset penalty) for every parameter."""
    grads = {"fc_weight": grad_logits.T @ cache["pooled3"], "fc_bias": grad_logits.sum(axis=0)}
    h3 = cache["h3"]
    grad_pooled3 = grad_logits @ params["fc_weight"]
    grad_h3 = grad_pooled3[:, :, None, None] * (h3 > 0) / (h3.shape[2] * h3.shape[3])
    # the deformable layer: cupydcn's explicit backward
    conv_grads = deform_conv2d_backward(
        grad_h3,
        cache["features"],
        cache["offsets"],
        params["deform_weight"],
        padding=1,
        wrt=("input", "weight", "bias") + (("offset",) if offsets_enabled else ()),
    )
    grads["deform_weight"], grads["deform_bias"] = conv_grads.grad_weight, conv_grads.grad_bias
    grad_features = conv_grads.grad_input
    if offsets_enabled:
        offsets = cache["offsets"]
        grad_offsets = conv_grads.grad_offset + (2 * OFFSET_PENALTY / offsets.size) * offsets
        grad_from_offsets, grads["offset_weight"] = _conv_backward(
            xp,
            grad_offsets,
            cache["offset_columns"],
            params["offset_weight"],
            cache["features"].shape,
        )
        grads["offset_bias"] = grad_offsets.sum(axis=(0, 2, 3))
        grad_features = grad_features + grad_from_offsets
    else:
        grads["offset_weight"] = xp.zeros_like(params["offset_weight"])
        grads["offset_bias"] = xp.zeros_like(params["offset_bias"])
    grad_h2 = grad_features * (cache["h2"] > 0)
    grad_pooled, grads["conv2"] = _conv_backward(
        xp, grad_h2, cache["columns2"], params["conv2"], cache["pooled"].shape
    )
    grad_a1 = xp.repeat(xp.repeat(grad_pooled, 2, axis=2), 2, axis=3) / 4
    grad_h1 = grad_a1 * (cache["h1"] > 0)
    _, grads["conv1"] = _conv_backward(
        xp, grad_h1, cache["columns1"], params["conv1"], cache["images"].shape, need_input=False
    )
    return grads


# ---------------------------------------------------------------------------- evaluation


def _object_cells(images: np.ndarray) -> np.ndarray:
    """[N, 16, 16] bool: the deformable layer's cells (2 x 2 pixels) that a dot covers
    (some pixel of the cell at least half inside the dot)."""
    n = images.shape[0]
    return images[:, 0].reshape(n, FEATURE, 2, FEATURE, 2).max(axis=(2, 4)) >= 0.5


def evaluate(xp, params, test, *, offsets_enabled=True):
    images, labels, separation, _ = test
    logits, cache = forward(xp, params, xp.asarray(images), offsets_enabled=offsets_enabled)
    loss, _ = loss_and_grad(xp, logits, xp.asarray(labels))
    correct = _host(logits.argmax(axis=1) == xp.asarray(labels))
    accuracy = float(correct.mean())
    offsets = cache["offsets"]
    dilation = _host(effective_dilation(offsets, kernel_size=3, padding=1))[:, 0]  # [N, 16, 16]
    cells = _object_cells(images)
    per_image = np.array(
        [dilation[i][cells[i]].mean() if cells[i].any() else np.nan for i in range(len(images))]
    )
    return dict(
        loss=float(loss),
        accuracy=accuracy,
        correct=correct,
        dilation=dilation,
        cells=cells,
        per_image=per_image,
        separation=separation,
        offsets=_host(offsets),
    )


def _host(array) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


def dilation_by_size(result) -> list[tuple[float, float, float, float, int]]:
    """Per size bin: (low, high, mean effective dilation over the dots' cells, accuracy,
    images)."""
    rows = []
    for low, high in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
        chosen = (result["separation"] >= low) & (result["separation"] < high)
        values = np.concatenate(
            [result["dilation"][i][result["cells"][i]] for i in np.flatnonzero(chosen)]
            or [np.zeros(0)]
        )
        rows.append(
            (
                low,
                high,
                float(values.mean()) if values.size else float("nan"),
                float(result["correct"][chosen].mean()) if chosen.any() else float("nan"),
                int(chosen.sum()),
            )
        )
    return rows


# ---------------------------------------------------------------------------- picture


def draw(path, test, result, *, title: str) -> None:
    """The demo's PNG: learned sampling locations on small and large test pairs, and the
    effective dilation against the pair's separation."""
    from matplotlib.figure import Figure

    from cupydcn.viz import plot_sampling_points

    images, labels, separation, centres = test
    figure = Figure(figsize=(11, 5.6), dpi=100, layout="constrained")
    grid = figure.add_gridspec(2, 4, width_ratios=(1, 1, 1, 1.35))
    order = np.argsort(separation)

    def pick(candidates):  # one side-by-side pair, one stacked pair, one more
        chosen = [next(i for i in candidates if labels[i] == label) for label in (0, 1)]
        return chosen + [next(i for i in candidates if i not in chosen)]

    small, large = pick(order[:60]), pick(order[::-1][:60])
    for row, chosen in enumerate((small, large)):
        for column, index in enumerate(chosen):
            ax = figure.add_subplot(grid[row, column])
            cells = np.clip(np.floor(centres[index] / 2), 0, FEATURE - 1)  # the dots' cells
            plot_sampling_points(
                images[index, 0],
                result["offsets"][index],
                cells,
                kernel_size=3,
                padding=1,
                input_stride=2,
                ax=ax,
                title=f"{'small' if row == 0 else 'large'} pair, {separation[index]:.0f} px: "
                f"dilation {result['per_image'][index]:.1f}",
            )
    scatter_ax = figure.add_subplot(grid[:, 3])
    valid = np.isfinite(result["per_image"])
    scatter_ax.scatter(
        separation[valid],
        result["per_image"][valid],
        s=8,
        alpha=0.5,
        color="#377eb8",
        linewidths=0,
        label="test images",
    )
    rows = dilation_by_size(result)
    scatter_ax.plot(
        [(row[0] + row[1]) / 2 for row in rows],
        [row[2] for row in rows],
        "o-",
        color="#e41a1c",
        label="mean per size bin",
    )
    scatter_ax.axhline(
        1.0, color="gray", linestyle="--", linewidth=1, label="regular 3x3 conv (zero offsets)"
    )
    scatter_ax.set_xlabel("pair separation (pixels)")
    scatter_ax.set_ylabel("effective dilation on the dots (cells of the 16x16 grid)")
    scatter_ax.set_title("larger objects, larger receptive field", fontsize=10)
    scatter_ax.legend(fontsize=8, loc="upper left")
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=100, format="png")


# ---------------------------------------------------------------------------- main


def _array_module(device: str):
    """NumPy, or CuPy for ``--device cuda``; (None, why) when there is no CUDA device."""
    if device == "cpu":
        return np, None
    _, reason = cuda_device_count()
    if reason is not None:
        return None, reason
    import cupy

    return cupy, None


def run_demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cupydcn demo",
        description="Train a tiny deformable conv net on pairs of dots at random scales with "
        "cupydcn's explicit forward/backward; print the effective dilation on small and large "
        "objects and write a PNG of the learned sampling locations.",
    )
    parser.add_argument(
        "--steps", type=non_negative_int, default=300, help="training steps (default 300)"
    )
    parser.add_argument(
        "--output",
        default="cupydcn-demo.png",
        help="PNG to write (default cupydcn-demo.png); needs matplotlib",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per step (default 32)"
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: NumPy arrays (default); cuda: CuPy arrays on the GPU",
    )
    parser.add_argument(
        "--frozen-offsets",
        action="store_true",
        help="baseline: keep the offsets at zero (a regular 3x3 conv)",
    )
    args = parser.parse_args(argv)
    # Checked before training: the folder of --output, and the device.
    if reason := unwritable_reason(args.output):
        return fail(parser.prog, f"--output {args.output}: {reason}")
    xp, reason = _array_module(args.device)
    if xp is None:
        return fail(parser.prog, f"--device cuda: {reason}", code=1)

    started = time.perf_counter()
    offsets_enabled = not args.frozen_offsets
    rng = np.random.default_rng(args.seed)
    test = make_pairs(np.random.default_rng(args.seed + 1_000_003), TEST_IMAGES)
    params = init_params(xp, rng)
    print(
        f"cupydcn demo: {'NumPy on the CPU' if args.device == 'cpu' else 'CuPy on the GPU'}; "
        f"pairs of dots 6-22 px apart in 32x32 images, side by side or stacked?"
    )
    print(
        f"network: conv-pool-conv features -> deformable 3x3 "
        f"({'offsets frozen at zero' if not offsets_enabled else 'learned offsets'}) -> "
        f"global average -> linear; Adam, {args.steps} steps of {args.batch_size} images"
    )
    # Small GEMMs everywhere: one BLAS thread on the CPU (cupydcn/core/threads.py), so a
    # busy machine's cores are not oversubscribed by BLAS's thread pool.
    with blas_threads_for(0) if args.device == "cpu" else contextlib.nullcontext():
        before = evaluate(xp, params, test, offsets_enabled=offsets_enabled)
        print(f"before training: test loss {before['loss']:.3f}, accuracy {before['accuracy']:.1%}")

        first_moment = {name: xp.zeros_like(p) for name, p in params.items()}
        second_moment = {name: xp.zeros_like(p) for name, p in params.items()}
        report_every = max(1, args.steps // 6)
        for step in range(1, args.steps + 1):
            images, labels, _, _ = make_pairs(rng, args.batch_size)
            labels = xp.asarray(labels)
            logits, cache = forward(xp, params, xp.asarray(images), offsets_enabled=offsets_enabled)
            loss, grad_logits = loss_and_grad(xp, logits, labels)
            grads = backward(xp, params, cache, grad_logits, offsets_enabled=offsets_enabled)
            # Adam with a cosine learning-rate decay: the whole optimiser.
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
            for name, p in params.items():
                first_moment[name] = 0.9 * first_moment[name] + 0.1 * grads[name]
                second_moment[name] = 0.999 * second_moment[name] + 0.001 * grads[name] ** 2
                m_hat = first_moment[name] / (1 - 0.9**step)
                v_hat = second_moment[name] / (1 - 0.999**step)
                p -= lr * m_hat / (xp.sqrt(v_hat) + 1e-8)
            if step % report_every == 0 or step == args.steps:
                accuracy = float((logits.argmax(axis=1) == labels).mean())
                print(
                    f"  step {step:4d}: batch loss {float(loss):.3f}, accuracy {accuracy:.0%} "
                    f"({time.perf_counter() - started:.1f} s)"
                )

        after = evaluate(xp, params, test, offsets_enabled=offsets_enabled)
    print(f"after training:  test loss {after['loss']:.3f}, accuracy {after['accuracy']:.1%}")
    print(
        "effective dilation on the dots (mean distance between adjacent taps' sampling "
        "locations, in cells of the 16x16 grid = 2 px; 1.00 = regular 3x3 conv):"
    )
    rows = dilation_by_size(after)
    for index, (low, high, mean, accuracy, count) in enumerate(rows):
        name = "small" if index == 0 else "large" if index == len(rows) - 1 else ""
        print(
            f"  pairs {low:2.0f}-{high:2.0f} px apart {name:>5s}: {mean:5.2f}   "
            f"(accuracy {accuracy:4.0%}, {count} images)"
        )
    print(f"effective dilation small vs large objects: {rows[0][2]:.2f} vs {rows[-1][2]:.2f}")

    title = (
        f"Side by side or stacked? Where the deformable 3x3 layer learned to sample for "
        f"the cells on the two dots (red, blue) - test accuracy {after['accuracy']:.0%}"
    )
    try:
        draw(args.output, test, after, title=title)
    except ImportError:
        print('no picture: matplotlib is missing (pip install "cupydcn[viz]")')
    else:
        print(f"wrote {args.output}")
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
