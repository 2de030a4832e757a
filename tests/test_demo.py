"""python -m cupydcn demo: a short run writes its PNG and prints the effective dilation;
the demo's hand-written backward pass matches finite differences."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cupydcn.cli import demo as _demo


def _check_png(path, width, height):
    from matplotlib.image import imread

    assert path.exists() and path.stat().st_size > 0
    pixels = imread(str(path))
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert float(rgb.var()) > 0 and len(np.unique(rgb, axis=0)) > 10


def test_short_run_writes_picture_and_prints_dilation(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert _demo.run_demo(["--steps", "6", "--output", str(path), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    _check_png(path, 1100, 560)
    match = re.search(r"effective dilation small vs large objects: (\d+\.\d+) vs (\d+\.\d+)", out)
    assert match, out
    assert all(0.5 < float(v) < 50 for v in match.groups())
    assert re.search(r"before training: test loss \d+\.\d+, accuracy \d+\.\d%", out)
    assert re.search(r"after training: +test loss \d+\.\d+, accuracy \d+\.\d%", out)
    assert len(re.findall(r"pairs +\d+-\d+ px apart", out)) == 4
    assert f"wrote {path}" in out


def test_frozen_offsets_baseline_keeps_dilation_one(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "frozen.png"
    assert _demo.run_demo(["--steps", "2", "--frozen-offsets", "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert "effective dilation small vs large objects: 1.00 vs 1.00" in out
    assert path.exists()


@pytest.mark.slow
def test_full_run_learns_larger_dilation_for_larger_objects(tmp_path, capsys):
    """The default demo (about 12 s on 2 CPU cores): the task is learned and the effective
    dilation on the largest pairs is well above that on the smallest (seed 0 gives 1.52
    vs 4.14; seeds 1 and 2 gave 1.84 vs 5.34 and 2.41 vs 8.65)."""
    pytest.importorskip("matplotlib")
    assert _demo.run_demo(["--output", str(tmp_path / "full.png")]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"after training: +test loss \d+\.\d+, accuracy (\d+\.\d)%", out)[1])
    small, large = (
        float(v)
        for v in re.search(
            r"effective dilation small vs large objects: (\d+\.\d+) vs (\d+\.\d+)", out
        ).groups()
    )
    assert accuracy >= 95, out
    assert large > 1.5 * small and small > 1.1, out


def test_make_pairs():
    images, labels, separation, centres = _demo.make_pairs(np.random.default_rng(0), 64)
    assert images.shape == (64, 1, 32, 32) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() == 1
    assert set(labels.tolist()) == {0, 1}
    assert ((separation >= 6) & (separation <= 22)).all()
    radius = _demo.DOT_RADIUS * separation
    assert (centres.min(axis=(1, 2)) - radius > 0).all()
    assert (centres.max(axis=(1, 2)) + radius < 32).all()
    np.testing.assert_allclose(np.linalg.norm(centres[:, 0] - centres[:, 1], axis=1), separation)
    # side by side: the pair's axis within 15 degrees of horizontal; stacked: of vertical
    delta = np.abs(centres[:, 0] - centres[:, 1])
    angle = np.degrees(np.arctan2(delta[:, 0], delta[:, 1]))
    assert (angle[labels == 0] <= 15 + 1e-9).all() and (angle[labels == 1] >= 75 - 1e-9).all()


def _loss(params, images, labels):
    logits, cache = _demo.forward(np, params, images)
    loss, grad = _demo.loss_and_grad(np, logits, labels)
    offsets = cache["offsets"]
    return loss + _demo.OFFSET_PENALTY * np.mean(offsets**2), cache, grad


def test_backward_matches_finite_differences():
    """The demo's own backward pass (plain conv, pooling, linear, loss, offset penalty)
    chained with cupydcn.deform_conv2d_backward, in float64, against central differences
    of the loss at a few coordinates of every parameter."""
    rng = np.random.default_rng(7)
    params = {k: v.astype(np.float64) for k, v in _demo.init_params(np, rng).items()}
    params["offset_weight"] = 0.05 * rng.standard_normal(params["offset_weight"].shape)
    params["offset_bias"] = 0.3 * rng.standard_normal(params["offset_bias"].shape)
    # a zero bias puts every background cell exactly on the ReLU's kink (the background's
    # features are exactly zero), where central differences average the two sides
    params["deform_bias"] = 0.1 * rng.standard_normal(params["deform_bias"].shape)
    params["fc_bias"] = 0.1 * rng.standard_normal(params["fc_bias"].shape)
    images, labels, _, _ = _demo.make_pairs(rng, 3)
    images = images.astype(np.float64)
    _, cache, grad_logits = _loss(params, images, labels)
    grads = _demo.backward(np, params, cache, grad_logits)
    assert set(grads) == set(params)
    eps = 1e-6
    for name, value in params.items():
        assert grads[name].shape == value.shape
        flat = value.reshape(-1)
        for index in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            saved = flat[index]
            flat[index] = saved + eps
            up = _loss(params, images, labels)[0]
            flat[index] = saved - eps
            down = _loss(params, images, labels)[0]
            flat[index] = saved
            numeric = (up - down) / (2 * eps)
            analytic = grads[name].reshape(-1)[index]
            assert abs(numeric - analytic) <= 1e-5 + 1e-3 * abs(numeric), (
                name,
                index,
                numeric,
                analytic,
            )


def test_bad_arguments():
    with pytest.raises(SystemExit):
        _demo.run_demo(["--steps", "-1"])
    with pytest.raises(SystemExit):
        _demo.run_demo(["--device", "tpu"])
