"""cupydcn.viz draws PNGs of the expected pixel size that are not blank, from any array
type, without pyplot; without matplotlib it says which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from cupydcn import viz  # noqa: E402
from cupydcn.deform_conv.sampling import effective_dilation  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports this checkout's cupydcn."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _image(size=24):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.float32)


def _offsets(size=24, seed=0, layers=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1.0, (18, size, size)).astype(np.float32) for _ in range(layers)]


def _check_png(path, width, height):
    assert path.exists() and path.stat().st_size > 0
    pixels = imread(str(path))
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert float(rgb.var()) > 0
    assert len(np.unique(rgb, axis=0)) > 10  # not one colour, not a bare frame


def test_one_layer(tmp_path):
    path = tmp_path / "one.png"
    figure = viz.plot_sampling_points(
        _image(),
        _offsets()[0],
        [[12, 12], [5, 18]],
        kernel_size=3,
        padding=1,
        path=path,
        title="one layer",
    )
    assert isinstance(figure, Figure)
    _check_png(path, 400, 400)


def test_stack_with_masks_and_size(tmp_path):
    rng = np.random.default_rng(1)
    masks = [rng.uniform(size=(9, 24, 24)).astype(np.float32) for _ in range(3)]
    path = tmp_path / "stack.png"
    viz.plot_sampling_points(
        np.stack([_image()] * 3),
        _offsets(layers=3),
        [[12, 12]],
        kernel_size=3,
        padding=1,
        masks=masks,
        path=path,
        figsize=(5, 4),
        dpi=80,
    )
    _check_png(path, 400, 320)


def test_input_stride_maps_feature_grid_to_the_image(tmp_path):
    offsets = np.zeros((18, 6, 6), np.float32)
    figure = viz.plot_sampling_points(
        _image(), offsets, [[3, 3]], kernel_size=3, padding=1, input_stride=4
    )
    axes = figure.axes[0]
    points = axes.collections[0].get_offsets()
    # feature cells 2..4 are centred on image pixels 4 * c + 1.5
    assert sorted(set(np.asarray(points)[:, 0].tolist())) == [9.5, 13.5, 17.5]
    path = tmp_path / "stride.png"
    figure.savefig(path)
    _check_png(path, 400, 400)


def test_draws_into_given_axes(tmp_path):
    figure = Figure(figsize=(6, 3), dpi=100)
    left, right = figure.subplots(1, 2)
    assert (
        viz.plot_sampling_points(
            _image(), _offsets()[0], [[4, 4]], kernel_size=3, padding=1, ax=right
        )
        is figure
    )
    assert len(right.collections) >= 2 and not left.collections
    path = tmp_path / "axes.png"
    figure.savefig(path)
    _check_png(path, 600, 300)


def test_effective_dilation_picture(tmp_path):
    offset = np.random.default_rng(2).normal(0, 1, (2, 18, 24, 24)).astype(np.float32)
    dilation = effective_dilation(offset, kernel_size=3, padding=1)
    object_mask = np.zeros((2, 1, 24, 24), bool)
    object_mask[:, :, 6:18, 6:18] = True
    path = tmp_path / "dilation.png"
    viz.plot_effective_dilation(
        dilation,
        image=_image(),
        groups={"object": object_mask, "background": ~object_mask},
        path=path,
        title="effective dilation",
    )
    _check_png(path, 800, 350)
    plain = tmp_path / "plain.png"
    viz.plot_effective_dilation(dilation[0, 0], path=plain, figsize=(6, 3), dpi=50)
    _check_png(plain, 300, 150)


def test_torch_arrays(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "torch.png"
    viz.plot_sampling_points(
        torch.from_numpy(_image()),
        torch.from_numpy(_offsets()[0]),
        torch.tensor([[12, 12]]),
        kernel_size=3,
        padding=1,
        path=path,
    )
    _check_png(path, 400, 400)
    dilation = effective_dilation(torch.from_numpy(_offsets()[0])[None], kernel_size=3, padding=1)
    viz.plot_effective_dilation(dilation, path=tmp_path / "torch_dilation.png")
    _check_png(tmp_path / "torch_dilation.png", 800, 350)


def test_bad_image_shape():
    import cupydcn

    with pytest.raises(cupydcn.CupydcnValueError, match="image must be"):
        viz.plot_sampling_points(
            np.zeros((2, 24, 24)), _offsets()[0], [[1, 1]], kernel_size=3, padding=1
        )


def test_without_matplotlib_the_error_names_the_extra():
    """Importing cupydcn.viz needs no matplotlib; calling it says how to get it. Run in a
    fresh interpreter with matplotlib made unimportable."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import numpy as np\n"
        "import cupydcn.viz as viz\n"
        "try:\n"
        "    viz.plot_effective_dilation(np.ones((4, 4)))\n"
        "except ImportError as exc:\n"
        "    print('ERROR:', exc)\n"
    )
    output = _python(code)
    assert "ERROR:" in output and "cupydcn[viz]" in output, output


def test_pyplot_is_never_imported():
    code = (
        "import sys, numpy as np\n"
        "import cupydcn.viz as viz\n"
        "viz.plot_effective_dilation(np.random.default_rng(0).random((4, 4)))\n"
        "viz.plot_sampling_points(np.ones((8, 8)), np.zeros((18, 8, 8)), [[3, 3]], "
        "kernel_size=3, padding=1)\n"
        "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'clean')\n"
    )
    assert _python(code).strip() == "clean"


def test_torch_tensors_that_require_grad(tmp_path):
    """A picture of a training model's offsets: tensors that require grad are drawn from
    their values (the plotting functions are not part of any graph)."""
    torch = pytest.importorskip("torch")
    offsets = torch.from_numpy(_offsets()[0]).requires_grad_(True)
    path = tmp_path / "grad.png"
    viz.plot_sampling_points(
        torch.from_numpy(_image()),
        offsets,
        torch.tensor([[12, 12]]),
        kernel_size=3,
        padding=1,
        path=path,
    )
    _check_png(path, 400, 400)
    assert offsets.grad is None
