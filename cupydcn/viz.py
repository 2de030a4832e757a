"""Pictures of where deformable convolutions sample (matplotlib, an optional extra).

    pip install "cupydcn[viz]"

* :func:`plot_sampling_points` — the sampling points of chosen output positions over an
  image, for one deformable layer or a stack of them (the DCN paper's figure 5), coloured
  by the DCNv2 mask when masks are given;
* :func:`plot_effective_dilation` — a heatmap and a histogram of the effective dilation
  (:func:`cupydcn.effective_dilation`), optionally one histogram per group of positions
  (e.g. small versus large objects).

Arrays may be of any library cupydcn accepts (they are copied to NumPy for drawing).
Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``)
and saved with its Agg renderer; pyplot is never imported, so the global backend and
pyplot's figure list are left alone. Each function returns the ``Figure`` it drew on,
and writes it to ``path`` (PNG, exactly ``figsize * dpi`` pixels) when one is given.
matplotlib is imported when a function is called, not when this module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from cupydcn.core import arrays as _arrays
from cupydcn.core.checks import int_pair
from cupydcn.core.errors import value_error
from cupydcn.deform_conv.sampling import stacked_sampling_locations

__all__ = ["plot_effective_dilation", "plot_sampling_points"]


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "cupydcn.viz needs matplotlib, which comes with the optional extra 'viz': "
            'pip install "cupydcn[viz]" (or pip install matplotlib)'
        ) from exc
    return Figure


def _to_numpy(op: str, name: str, array) -> np.ndarray | None:
    """Any cupydcn-accepted array (or a nested list) as a float NumPy array on the host."""
    if array is None:
        return None
    if isinstance(array, (list, tuple, int, float)):
        return np.asarray(array, dtype=np.float64)
    if hasattr(array, "requires_grad") and hasattr(array, "detach"):
        array = array.detach()  # a picture is not part of any graph: a PyTorch tensor's values
    placement, native = _arrays.natives(op, {name: array})
    result = native[name]
    if placement.on_cuda:
        result = result.get()
    result = np.asarray(result)
    if result.dtype.kind == "f" and result.dtype.itemsize < 4 or result.dtype.name == "bfloat16":
        result = result.astype(np.float32)
    return result


def _image_for_display(op: str, image) -> tuple[np.ndarray, str | None]:
    """[H, W] (grey), [1 | 3, H, W] (cupydcn's channel-first layout) or [H, W, 3 | 4]."""
    image = _to_numpy(op, "image", image)
    if image.ndim == 2:
        return image, "gray"
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        return image, "gray" if image.ndim == 2 else None
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image, None
    raise value_error(
        op, f"image must be [H, W], [1 or 3, H, W] or [H, W, 3 or 4]; got shape {image.shape}"
    )


def _new_figure(ax, figsize, dpi, ncols=1, width_ratios=None):
    Figure = _matplotlib()
    if ax is not None:
        return ax.figure, [ax]
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.subplots(1, ncols, width_ratios=width_ratios, squeeze=False)[0]
    return figure, list(axes)


def _save(figure, path, dpi):
    if path is not None:
        figure.savefig(os.fspath(path), dpi=dpi, format="png")


def _as_layers(op: str, name: str, value):
    """One array or a list of them -> (list of batch-1 arrays, was_list)."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    layers = []
    for index, item in enumerate(items):
        if item is None:
            layers.append(None)
            continue
        array = _to_numpy(op, name, item)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[0] != 1:
            raise value_error(
                op,
                f"{name}[{index}] must be one image's [C, H_out, W_out] (or [1, C, H_out, "
                f"W_out]); got shape {array.shape}",
            )
        layers.append(array)
    return layers


def _centre(points: np.ndarray, kernel_size, stride, padding, dilation, layers: int) -> np.ndarray:
    """Image position of the regular (zero-offset) kernel centre of each output point."""

    def per_layer(value):
        return list(value) if isinstance(value, list) else [value] * layers

    centre = points.astype(np.float64)
    for k, s, p, d in reversed(
        list(
            zip(per_layer(kernel_size), per_layer(stride), per_layer(padding), per_layer(dilation))
        )
    ):
        k, s, p, d = (
            np.asarray(int_pair("plot_sampling_points", n, v, minimum=0), np.float64)
            for n, v in (("kernel_size", k), ("stride", s), ("padding", p), ("dilation", d))
        )
        centre = centre * s - p + (k - 1) / 2 * d
    return centre


def plot_sampling_points(
    image,
    offsets,
    points,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    masks=None,
    offset_group=0,
    interpolation: str = "bilinear",
    input_stride=1,
    ax=None,
    path=None,
    title: str | None = None,
    figsize=(4.0, 4.0),
    dpi: int = 100,
    cmap: str = "gray",
    colorbar: bool = True,
):
    """Draw the sampling points of output positions ``points`` over ``image``.

    ``image``: one input image, ``[H, W]``, ``[1 or 3, H, W]`` or ``[H, W, 3 or 4]``.
    ``offsets``: that image's offsets of one deformable layer, ``[2 * G * K, H_out, W_out]``
    (or with a batch of 1), or a list of them for a stack (the layer next to the image
    first); ``points`` ``[P, 2]``: ``(oy, ox)`` in the last layer's output grid. Geometry
    arguments, ``offset_group`` and ``interpolation`` as in
    :func:`cupydcn.stacked_sampling_locations` (a stack of ``L`` 3 x 3 layers gives 9^L
    points per output position). ``masks``: the matching DCNv2 mask(s) (or None); the
    points are then coloured by the mask (by the product of the masks along the stack),
    with a colour bar. A green cross marks each output position's regular kernel centre.

    ``input_stride`` (an int or an ``(h, w)`` pair) is for a first layer that reads a
    feature map downsampled ``input_stride`` times from ``image`` (e.g. by pooling): a
    point ``p`` of that map is drawn at ``input_stride * p + (input_stride - 1) / 2``
    image pixels, the centre of its cell.

    Draws into ``ax`` when given, else into a new ``figsize * dpi`` figure; writes a PNG
    to ``path`` when given. Returns the figure.
    """
    op = "plot_sampling_points"
    figure, (axes,) = _new_figure(ax, figsize, dpi)
    picture, image_cmap = _image_for_display(op, image)
    layers = _as_layers(op, "offsets", offsets)
    mask_layers = _as_layers(op, "masks", masks)
    if mask_layers is not None and len(mask_layers) != len(layers):
        raise value_error(op, f"masks has {len(mask_layers)} layers; offsets has {len(layers)}")
    points = _to_numpy(op, "points", points)
    sampled = stacked_sampling_locations(
        [layer.astype(np.float64) for layer in layers],
        points,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        masks=None
        if mask_layers is None
        else [None if m is None else m.astype(np.float64) for m in mask_layers],
        offset_group=offset_group,
        interpolation=interpolation,
    )
    locations = np.asarray(sampled.locations)[0]  # [P, T, 2]
    weights = None if sampled.weights is None else np.asarray(sampled.weights)[0]
    centres = _centre(np.asarray(points), kernel_size, stride, padding, dilation, len(layers))
    scale = np.asarray(int_pair(op, "input_stride", input_stride, minimum=1), np.float64)
    locations = locations * scale + (scale - 1) / 2
    centres = centres * scale + (scale - 1) / 2

    height, width = picture.shape[:2]
    axes.imshow(
        picture,
        cmap=image_cmap,
        interpolation="nearest",
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
    )
    total = locations.shape[1]
    size = float(np.clip(40.0 / np.sqrt(total / 9.0), 3.0, 40.0))
    colours = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#a65628", "#f781bf")
    scatter = None
    for index in range(locations.shape[0]):
        ys, xs = locations[index, :, 0], locations[index, :, 1]
        if weights is None:
            axes.scatter(
                xs, ys, s=size, color=colours[index % len(colours)], alpha=0.8, linewidths=0
            )
        else:
            scatter = axes.scatter(
                xs,
                ys,
                s=size,
                c=weights[index],
                cmap="viridis",
                vmin=0.0,
                vmax=max(1.0, float(weights.max())),
                alpha=0.9,
                linewidths=0,
            )
    axes.scatter(centres[:, 1], centres[:, 0], marker="x", s=60, color="#00c000", linewidths=2)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_xticks([])
    axes.set_yticks([])
    if title is not None:
        axes.set_title(title, fontsize=9)
    if scatter is not None and colorbar:
        figure.colorbar(scatter, ax=axes, shrink=0.8, label="mask")
    _save(figure, path, dpi)
    return figure


def plot_effective_dilation(
    dilation,
    *,
    image=None,
    groups: Mapping[str, object] | None = None,
    bins: int = 30,
    path=None,
    title: str | None = None,
    figsize=(8.0, 3.5),
    dpi: int = 100,
):
    """A heatmap and a histogram of effective dilation.

    ``dilation``: the result of :func:`cupydcn.effective_dilation`, ``[N, G, H_out, W_out]``
    (or any ``[..., H_out, W_out]``, or one ``[H_out, W_out]`` map). The heatmap shows the
    first image's map (averaged over offset groups); the histogram all values, or, when
    ``groups`` maps labels to boolean masks broadcastable to ``dilation``'s shape (for
    instance the output positions on small and on large objects), one histogram per group
    with its mean in the legend. ``image`` (optional) is drawn in a first panel.

    Writes a PNG to ``path`` when given; returns the figure.
    """
    op = "plot_effective_dilation"
    values = _to_numpy(op, "dilation", dilation)
    if values.ndim < 2:
        raise value_error(
            op, f"dilation must be at least 2-D [..., H_out, W_out]; got shape {values.shape}"
        )
    first = values
    while first.ndim > 3:
        first = first[0]
    heat = first.mean(axis=0) if first.ndim == 3 else first
    panels = 3 if image is not None else 2
    figure, axes = _new_figure(
        None, figsize, dpi, ncols=panels, width_ratios=[1] * (panels - 1) + [1.4]
    )
    axes = list(axes)
    if image is not None:
        picture, image_cmap = _image_for_display(op, image)
        axes[0].imshow(picture, cmap=image_cmap, interpolation="nearest")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        axes[0].set_title("input", fontsize=9)
        axes = axes[1:]
    shown = axes[0].imshow(heat, cmap="magma", interpolation="nearest")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    axes[0].set_title("effective dilation", fontsize=9)
    figure.colorbar(shown, ax=axes[0], shrink=0.8)
    histogram = axes[1]
    finite = values[np.isfinite(values)]
    if groups:
        for label, selection in groups.items():
            selection = np.broadcast_to(
                _to_numpy(op, f"groups[{label!r}]", selection).astype(bool), values.shape
            )
            chosen = values[selection & np.isfinite(values)]
            if chosen.size:
                histogram.hist(
                    chosen,
                    bins=bins,
                    alpha=0.6,
                    density=True,
                    label=f"{label} (mean {chosen.mean():.2f})",
                )
        histogram.legend(fontsize=8)
    elif finite.size:
        histogram.hist(finite, bins=bins, color="#377eb8")
    histogram.set_xlabel("effective dilation", fontsize=9)
    histogram.set_ylabel("density" if groups else "count", fontsize=9)
    if title is not None:
        figure.suptitle(title, fontsize=10)
    _save(figure, path, dpi)
    return figure
