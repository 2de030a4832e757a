"""Train a ModulatedDeformConv2dPack and a plain convolution side by side (PyTorch, CPU or
CUDA).

The task: each 24 x 24 image holds two blurred dots, and the class is the direction of
the line through them (horizontal, vertical, diagonal or anti-diagonal). The distance
between the dots is random, 5 to 11 pixels: the pattern comes at a random scale. Both
networks are the same small CNN (a 3 x 3 stem, max pooling, one 3 x 3 layer, global max
pooling, a linear classifier) except for that one layer: ``nn.Conv2d`` in the plain
network, ``cupydcn.torch.ModulatedDeformConv2dPack`` in the deformable one. The plain
layer sees about 8 x 8 input pixels, too few to hold both dots of a wide pair; the
deformable layer starts as a plain convolution too (its offset predictor is initialised
to zero) and learns where to sample, reaching the second dot.

Run ``python examples/torch_train.py`` (about 10 s of CPU time; ``--steps`` to change
the length, ``--device cuda`` for a GPU). It prints the validation loss of both networks
as they train, then the final losses and accuracies and the mean length of the offsets
the deformable layer learned.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import cupydcn.torch as ct

SIZE = 24
# (dy, dx) of each class's line
DIRECTIONS = {
    "horizontal": (0, 1),
    "vertical": (1, 0),
    "diagonal": (1, 1),
    "anti-diagonal": (1, -1),
}
DISTANCE = (5.0, 11.0)  # between the two dots, in pixels
BLUR = 1.5  # standard deviation of the Gaussian dots, in pixels
NOISE = 0.05
MARGIN = 2.5  # dot centres stay this far from the border


def make_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 1, SIZE, SIZE] (float32) and their classes [n] (int64)."""
    labels = rng.integers(0, len(DIRECTIONS), n)
    unit = np.array(list(DIRECTIONS.values()), dtype=np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    distance = rng.uniform(*DISTANCE, n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    step = unit[labels] * (distance * sign)[:, None]  # from the first dot to the second
    low = MARGIN + np.abs(step) / 2
    middle = low + rng.random((n, 2)) * (SIZE - 2 * low)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    images = np.zeros((n, SIZE, SIZE))
    for centre in (middle - step / 2, middle + step / 2):
        cy, cx = centre[:, 0, None, None], centre[:, 1, None, None]
        images += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * BLUR**2))
    images += NOISE * rng.standard_normal(images.shape)
    return (
        torch.from_numpy(images[:, None].astype(np.float32)),
        torch.from_numpy(labels.astype(np.int64)),
    )


def build_model(deformable: bool) -> nn.Sequential:
    """The small CNN; ``deformable`` picks the middle layer."""
    if deformable:
        layer = ct.ModulatedDeformConv2dPack(8, 16, 3, padding=1)
    else:
        layer = nn.Conv2d(8, 16, 3, padding=1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 24 x 24 -> 12 x 12
        layer,
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, len(DIRECTIONS)),
    )


def _evaluate(model, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def _mean_offset_length(layer: ct.ModulatedDeformConv2dPack, features: torch.Tensor) -> float:
    """Mean length in pixels of the (dy, dx) offsets the layer predicts on ``features``."""
    with torch.no_grad():
        o1, o2, _ = torch.chunk(layer.conv_offset(features), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)  # (dy, dx) pairs, tap by tap
        n, _, h, w = offset.shape
        return offset.view(n, -1, 2, h, w).norm(dim=2).mean().item()


def train(
    deformable: bool,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-2,
    eval_every: int = 50,
    device: str = "cpu",
    log=print,
) -> dict:
    """Train one network with Adam; returns its validation-loss history, final loss and
    accuracy (on 512 images drawn once from a separate generator)."""
    torch.manual_seed(seed)
    model = build_model(deformable).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = np.random.default_rng(seed)
    x_val, y_val = (t.to(device) for t in make_batch(512, np.random.default_rng(seed + 10_000)))
    name = "deformable" if deformable else "plain"
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in make_batch(batch_size, data))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            val_loss, _ = _evaluate(model, x_val, y_val)
            history.append((step, val_loss))
            log(
                f"  {name:10s} step {step:4d}  train loss {loss.item():.4f}  "
                f"validation loss {val_loss:.4f}"
            )
    final_loss, accuracy = _evaluate(model, x_val, y_val)
    result = dict(
        history=history,
        final_loss=final_loss,
        accuracy=accuracy,
        seconds=time.perf_counter() - start,
    )
    if deformable:
        result["offset_px"] = _mean_offset_length(model[3], model[:3](x_val))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    options = dict(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        device=args.device,
    )
    print(
        f"Direction of a pair of dots {DISTANCE[0]:g}-{DISTANCE[1]:g} px apart, "
        f"{len(DIRECTIONS)} classes, {args.steps} steps of {args.batch_size} images"
    )
    results = {"plain": train(False, **options), "deformable": train(True, **options)}
    for name, r in results.items():
        print(
            f"{name:10s} final validation loss {r['final_loss']:.4f}  "
            f"accuracy {r['accuracy']:.3f}  ({r['seconds']:.1f} s)"
        )
    print(
        f"mean offset length learned by the deformable layer: "
        f"{results['deformable']['offset_px']:.2f} px of its 12 x 12 input "
        f"(2 image pixels each)"
    )
    return results


if __name__ == "__main__":
    main()
