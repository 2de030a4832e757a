"""Train a small deformable network in JAX with cupydcn.jax, against a plain-conv baseline.

The task: images hold the 1-pixel outlines of squares and discs at random scales (4 to
16 pixels across); the network predicts, for every pixel, whether it lies inside a shape
(the filled shape). A pixel in the middle of a large shape sees nothing but background
within a 3 x 3 neighbourhood, so the answer needs context at the scale of the shape.

Both models are three 3 x 3 convolutions and a 1 x 1 head. In the deformable model the
second and third convolutions are ``ModulatedDeformConv2dPack``-like layers: a
zero-initialised 3 x 3 convolution predicts per-tap offsets and a sigmoid mask from the
layer's input, and ``cupydcn.jax.deform_conv2d`` samples there (DCNv2). Both models start
from the same convolution weights; the deformable layers start with zero offsets and a
mask of 0.5 (as mmcv's), and training (Adam, written out below; ``jax.grad`` through
``cupydcn.jax``, the whole step under ``jax.jit``) lets them move their taps outwards.

    python examples/jax_train.py [--steps 150] [--seed 0]

prints the training loss of both models every few steps and a held-out loss at the end.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import cupydcn.jax as dcn

SIZE = 24  # image side
CHANNELS = 8  # hidden channels
BATCH = 16


# ---------------------------------------------------------------------------- data
def make_batch(rng: np.random.Generator, batch: int = BATCH):
    """Outlines of one or two shapes per image (input) and the filled shapes (target)."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32) + 0.5
    images = np.zeros((batch, 1, SIZE, SIZE), np.float32)
    targets = np.zeros((batch, 1, SIZE, SIZE), np.float32)
    for b in range(batch):
        for _ in range(rng.integers(1, 3)):
            side = rng.uniform(4.0, 16.0)
            cy, cx = rng.uniform(side / 2, SIZE - side / 2, size=2)
            if rng.random() < 0.5:  # square
                dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
            else:  # disc
                dist = np.hypot(yy - cy, xx - cx)
            inside = dist <= side / 2
            outline = inside & (dist > side / 2 - 1)
            images[b, 0][outline] = 1.0
            targets[b, 0][inside] = 1.0
    return jnp.asarray(images), jnp.asarray(targets)


# ---------------------------------------------------------------------------- model
def conv(x, w, b, padding=1):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), [(padding, padding)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return y + b[None, :, None, None]


def init_conv(rng: np.random.Generator, c_out, c_in, k=3):
    """He-initialised weights, zero bias."""
    w = rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) * np.sqrt(2 / (c_in * k * k))
    return {"w": jnp.asarray(w), "b": jnp.zeros(c_out)}


def init_params(seed: int, deformable: bool):
    rng = np.random.default_rng(seed)  # the same convolutions for both models
    params = {
        "conv1": init_conv(rng, CHANNELS, 1),
        "conv2": init_conv(rng, CHANNELS, CHANNELS),
        "conv3": init_conv(rng, CHANNELS, CHANNELS),
        "head": init_conv(rng, 1, CHANNELS, k=1),
    }
    if deformable:  # offsets (2 per tap) and mask (1 per tap), zero-initialised
        for name in ("conv2", "conv3"):
            params[name]["offset_w"] = jnp.zeros((27, CHANNELS, 3, 3))
            params[name]["offset_b"] = jnp.zeros(27)
    return params


def deform_layer(p, x):
    """ModulatedDeformConv2dPack: offsets and mask predicted from x, then DCNv2."""
    predicted = conv(x, p["offset_w"], p["offset_b"])
    offset, mask = predicted[:, :18], jax.nn.sigmoid(predicted[:, 18:])
    return dcn.deform_conv2d(x, offset, p["w"], p["b"], padding=1, mask=mask)


def forward(params, images):
    x = jax.nn.relu(conv(images, **params["conv1"]))
    for name in ("conv2", "conv3"):
        p = params[name]
        x = jax.nn.relu(deform_layer(p, x) if "offset_w" in p else conv(x, p["w"], p["b"]))
    return conv(x, **params["head"], padding=0)


def loss_fn(params, images, targets):
    logits = forward(params, images)
    return jnp.mean(jnp.logaddexp(0.0, logits) - targets * logits)  # sigmoid cross-entropy


# ---------------------------------------------------------------------------- Adam
def adam_init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.int32)}


@jax.jit
def train_step(params, state, images, targets, lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, targets)
    t = state["t"] + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    params = jax.tree_util.tree_map(
        lambda p, m, v: p - lr * correction * m / (jnp.sqrt(v) + eps), params, m, v
    )
    return params, {"m": m, "v": v, "t": t}, loss


# ---------------------------------------------------------------------------- main
def train(steps: int, seed: int, log_every: int = 0) -> dict[str, float]:
    """Train both models on the same batches; return their held-out losses."""
    models = {
        name: init_params(seed, deformable=name == "deformable") for name in ("plain", "deformable")
    }
    states = {name: adam_init(p) for name, p in models.items()}
    data = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        images, targets = make_batch(data)
        losses = {}
        for name in models:
            models[name], states[name], loss = train_step(
                models[name], states[name], images, targets
            )
            losses[name] = float(loss)
        if log_every and (step % log_every == 0 or step == 1):
            print(f"step {step:4d}  " + "  ".join(f"{n} {l:.4f}" for n, l in losses.items()))
    images, targets = make_batch(np.random.default_rng(seed + 10_000), batch=64)
    return {name: float(loss_fn(p, images, targets)) for name, p in models.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    final = train(args.steps, args.seed, log_every=max(1, args.steps // 10))
    print(
        f"held-out loss after {args.steps} steps: plain {final['plain']:.4f}, "
        f"deformable {final['deformable']:.4f} ({time.perf_counter() - start:.1f} s, "
        f"{jax.default_backend()})"
    )
    return final


if __name__ == "__main__":
    main()
