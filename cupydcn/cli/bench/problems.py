"""The inputs: a problem's float32 host arrays (detection-like RoIs), and a
:class:`Problem` holding them on the device in one dtype, with the peers' tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .device import Device, Unavailable
from .shapes import ConvShape, Dcnv3Shape, Dcnv4Shape, MsdaShape, RoiShape, Shape


def torch_dtype(name: str):
    import torch

    return {
        "float64": torch.float64,
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def _rois(
    rng: np.random.Generator, count: int, batch: int, image_h: float, image_w: float
) -> np.ndarray:
    """Detection-like boxes: sides log-uniform in [16, half the image], inside the image."""
    side_max = min(image_h, image_w) / 2
    w = np.exp(rng.uniform(np.log(16), np.log(side_max), count))
    h = np.exp(rng.uniform(np.log(16), np.log(side_max), count))
    x1 = rng.uniform(0, image_w - w)
    y1 = rng.uniform(0, image_h - h)
    index = rng.integers(0, batch, count).astype(np.float64)
    return np.stack([index, x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def host_arrays(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 NumPy inputs of a problem (a mask is always made; DCNv1 leaves it out)."""
    rng = np.random.default_rng(seed)

    def normal(*dims, scale=1.0):
        return (scale * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)

    if isinstance(shape, ConvShape):
        taps = shape.kh * shape.kw
        ho, wo = shape.out_h, shape.out_w
        fan_in = shape.c_in // shape.groups * taps
        return {
            "input": normal(shape.n, shape.c_in, shape.h, shape.w),
            "offset": normal(shape.n, 2 * shape.offset_groups * taps, ho, wo),
            "weight": normal(
                shape.c_out, shape.c_in // shape.groups, shape.kh, shape.kw, scale=fan_in**-0.5
            ),
            "bias": normal(shape.c_out, scale=0.1),
            "mask": rng.uniform(size=(shape.n, shape.offset_groups * taps, ho, wo)).astype(
                np.float32
            ),
            "grad_output": normal(shape.n, shape.c_out, ho, wo),
        }
    if isinstance(shape, MsdaShape):
        n, lq, m, levels, p = shape.n, shape.lq, shape.heads, len(shape.levels), shape.points
        # Reference points inside the map plus offsets of a few pixels of the coarsest
        # level (some points fall outside and read zeros); softmax-like weights.
        reference = rng.uniform(size=(n, lq, 1, 1, 1, 2))
        coarsest = min(shape.levels, key=lambda hw: hw[0] * hw[1])
        spread = 2.0 / np.array([coarsest[1], coarsest[0]], dtype=np.float64)
        weights = rng.uniform(size=(n, lq, m, levels * p)).astype(np.float32)
        weights /= weights.sum(-1, keepdims=True)
        return {
            "value": normal(n, shape.keys, m, shape.head_dim),
            "sampling_locations": (
                reference + spread * rng.standard_normal((n, lq, m, levels, p, 2))
            ).astype(np.float32),
            "attention_weights": weights.reshape(n, lq, m, levels, p),
            "grad_output": normal(n, lq, m * shape.head_dim),
        }
    if isinstance(shape, Dcnv3Shape):
        n, ho, wo, g, taps = shape.n, shape.out_h, shape.out_w, shape.group, shape.points
        offset = normal(n, ho, wo, g, taps * 2)
        mask = rng.uniform(size=(n, ho, wo, g, taps)).astype(np.float32)
        mask /= mask.sum(-1, keepdims=True)  # the layer's softmax over the points
        arrays = {
            "input": normal(n, shape.h, shape.w, shape.channels),
            "grad_output": normal(n, ho, wo, shape.channels),
        }
        if isinstance(shape, Dcnv4Shape):
            packed = np.zeros((n, ho, wo, shape.offset_mask_dim), np.float32)
            packed[..., : g * 3 * taps] = np.concatenate([offset, mask], -1).reshape(n, ho, wo, -1)
            arrays["offset_mask"] = packed
        else:
            arrays["offset"] = offset.reshape(n, ho, wo, g * taps * 2)
            arrays["mask"] = mask.reshape(n, ho, wo, g * taps)
        return arrays
    if isinstance(shape, RoiShape):
        p = shape.output_size
        return {
            "input": normal(shape.n, shape.c, shape.h, shape.w),
            "rois": _rois(
                rng,
                shape.rois,
                shape.n,
                shape.h / shape.spatial_scale,
                shape.w / shape.spatial_scale,
            ),
            "offset": normal(shape.rois, 2, p, p),
            "mask": rng.uniform(size=(shape.rois, 1, p, p)).astype(np.float32),
            "grad_output": normal(shape.rois, shape.c, p, p),
        }
    p = shape.pooled_size
    return {
        "input": normal(shape.n, shape.c, shape.h, shape.w),
        "rois": _rois(
            rng, shape.rois, shape.n, shape.h / shape.spatial_scale, shape.w / shape.spatial_scale
        ),
        "offset": normal(shape.rois, 2, shape.part_size, shape.part_size),
        "grad_output": normal(shape.rois, shape.output_dim, p, p),
    }


@dataclass
class Problem:
    """A problem's arrays on the device in one dtype: ``arrays`` are what cupydcn gets
    (``rois`` stay float32); :meth:`peer` gives the same values as PyTorch tensors."""

    shape: Shape
    dtype: str
    device: Device
    arrays: dict[str, Any]

    @property
    def peer_dtype(self) -> str:
        return "float32" if self.dtype == "bfloat16" else self.dtype

    @property
    def peer_note(self) -> str:
        if self.dtype == "bfloat16":
            return "peer ran in float32 on the bfloat16 values upcast (protocol)"
        return ""

    def peer(self, name: str):
        """The PyTorch tensor of input ``name`` for a peer: the same tensor cupydcn got on
        a GPU (float32 copy for bfloat16); on the CPU a tensor sharing the NumPy memory;
        rois in the peer's dtype (torchvision wants one dtype)."""
        import torch

        array = self.arrays[name]
        if isinstance(array, np.ndarray):
            if array.dtype.name == "bfloat16" or name == "rois":
                array = array.astype(np.float32)
            tensor = torch.from_numpy(array)
        else:
            tensor = array
        target = torch_dtype(self.peer_dtype)
        return tensor if tensor.dtype == target else tensor.to(target)


def make_problem(
    shape: Shape, dtype: str, device: Device, host: dict[str, np.ndarray] | None = None
) -> Problem:
    host = host_arrays(shape) if host is None else host
    arrays: dict[str, Any] = {}
    for name, value in host.items():
        target = "float32" if name == "rois" else dtype
        arrays[name] = _to_device(value, target, device)
    return Problem(shape, dtype, device, arrays)


def _to_device(value: np.ndarray, dtype: str, device: Device):
    if device.kind != "cuda":
        from cupydcn.core.dtypes import numpy_dtype

        try:
            return np.ascontiguousarray(value.astype(numpy_dtype(dtype)))
        except ImportError as exc:
            raise Unavailable(str(exc)) from exc
    if device.library == "torch":
        import torch

        return torch.from_numpy(value).to("cuda").to(torch_dtype(dtype)).contiguous()
    import cupy

    if dtype == "bfloat16":
        from cupydcn.core.dtypes import numpy_dtype

        try:
            return cupy.asarray(value.astype(numpy_dtype("bfloat16")))
        except Exception as exc:  # CuPy without bfloat16 support
            raise Unavailable(f"CuPy cannot hold bfloat16 arrays here: {exc}") from exc
    return cupy.asarray(value).astype(dtype)
