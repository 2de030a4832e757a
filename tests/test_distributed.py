"""Distributed training with cupydcn's layers.

* PyTorch: a model with ``ModulatedDeformConv2dPack`` and ``DeformConv2dPack`` layers
  takes one SGD step under ``DistributedDataParallel`` (gloo, 2 CPU processes spawned by
  the test, each with half the batch) and under FSDP2 (``fully_shard``, gloo on the CPU):
  after the step its parameters and gradients equal those of a single-process step on the
  whole batch (float64; up to the rounding of the gradient all-reduce).
* JAX: ``cupydcn.jax.batch_sharded`` (a ``shard_map`` over the batch axis) under ``jit``
  with inputs sharded over 8 host devices (a subprocess, as
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts):
  values and gradients equal the unsharded call, each device computes only its shard
  (the callbacks see a per-device batch), and no all-gather appears in the compiled HLO.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
WORLD = 2
BATCH = 4  # 2 images per process
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    import torch

    import cupydcn.torch as ct

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        ct.ModulatedDeformConv2dPack(4, 4, 3, padding=1, groups=2, deform_groups=2),
        torch.nn.ReLU(),
        ct.DeformConv2dPack(4, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).double()
    with torch.no_grad():  # offsets that are not zero: the deformable paths are exercised
        for layer in (model[1], model[3]):
            layer.conv_offset.weight.normal_(0.0, 0.3)
            layer.conv_offset.bias.normal_(0.0, 0.5)
    return model


def _batch():
    import torch

    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(BATCH, 3, 6, 7, generator=g, dtype=torch.float64),
        torch.randn(BATCH, 2, generator=g, dtype=torch.float64),
    )


def _step(model, x, y):
    """One SGD step on the mean squared error; returns (parameters, gradients) by name."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state(model) -> dict:
    return {
        name: (_full(p.detach()).numpy().copy(), _full(p.grad).numpy().copy())
        for name, p in model.named_parameters()
    }


def _worker(out: str) -> None:
    """The ranks of the distributed steps, DDP then FSDP2 (run in subprocesses by the
    tests); rank 0 saves the results, or why FSDP2 could not run."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    try:
        from torch.nn.parallel import DistributedDataParallel

        model = _model()
        x, y = _batch()
        _step(DistributedDataParallel(model), x[share], y[share])
        results["ddp"] = _state(model)

        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # a torch without FSDP2
            Path(out + ".fsdp-skipped").write_text(f"no torch.distributed.fsdp.fully_shard: {e}")
        else:
            model = _model()
            mesh = init_device_mesh("cpu", (world,))
            for layer in (model[1], model[3]):
                fully_shard(layer, mesh=mesh)
            _step(fully_shard(model, mesh=mesh), x[share], y[share])
            results["fsdp"] = _state(model)  # full_tensor() gathers the shards (collective)
        if rank == 0:
            np.savez(
                out,
                **{
                    f"{mode}|{k}|{i}": v[i]
                    for mode, state in results.items()
                    for k, v in state.items()
                    for i in (0, 1)
                },
            )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_steps(tmp_path_factory) -> dict:
    """{mode: {name: (parameter, gradient)}} after one distributed step, rank 0's view."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    port = _free_port()
    out = tmp_path_factory.mktemp("distributed") / "steps.npz"
    code = f"import test_distributed as t; t._worker({str(out)!r})"  # noqa: E501
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=TESTS,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} failed:\n{text[-4000:]}")
    data = np.load(out)
    steps: dict = {"skipped": {}}
    skipped = Path(str(out) + ".fsdp-skipped")
    if skipped.exists():
        steps["skipped"]["fsdp"] = skipped.read_text()
    for key in data.files:
        mode, name, i = key.split("|")
        steps.setdefault(mode, {}).setdefault(name, [None, None])[int(i)] = data[key]
    return steps


def _single_process() -> dict:
    model = _model()
    _step(model, *_batch())
    return _state(model)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torch_distributed_step_equals_single_process(mode, distributed_steps):
    if mode not in distributed_steps:
        pytest.skip(distributed_steps["skipped"][mode])
    distributed = distributed_steps[mode]
    single = _single_process()
    assert set(distributed) == set(single) and len(single) == 11
    worst = 0.0
    for name, (param, grad) in single.items():
        got_param, got_grad = distributed[name]
        np.testing.assert_allclose(got_grad, grad, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(got_param, param, rtol=1e-12, atol=1e-14, err_msg=name)
        worst = max(
            worst, float(np.abs(got_grad - grad).max()), float(np.abs(got_param - param).max())
        )
    print(f"{mode}: max |difference| of parameters and gradients vs one process: {worst:.3g}")


# ---------------------------------------------------------------------------- JAX
_JAX_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import cupydcn
import cupydcn.jax as cj

assert len(jax.devices()) == 8, jax.devices()
batches = []  # the batch size every callback of cupydcn sees
forward, backward = cupydcn.deform_conv2d, cupydcn.deform_conv2d_backward
def counted_forward(input, *args, **kwargs):
    batches.append(int(input.shape[0]))
    return forward(input, *args, **kwargs)
def counted_backward(grad_output, input, *args, **kwargs):
    batches.append(int(input.shape[0]))
    return backward(grad_output, input, *args, **kwargs)
cupydcn.deform_conv2d, cupydcn.deform_conv2d_backward = counted_forward, counted_backward

results = {}
r = np.random.default_rng(0)
for case, (mesh_shape, axis_names, batch_axis, with_mask, options) in {
    "dcnv2-1d-mesh": ((8,), ("batch",), "batch", True,
                      dict(stride=(1, 2), padding=(1, 0), dilation=(2, 1))),
    "dcnv1-2d-mesh": ((4, 2), ("data", "model"), "data", False, dict(padding=1)),
}.items():
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axis_names)
    n, c, h, w, kh, kw, groups, og = 16, 4, 6, 7, 3, 3, 2, 2
    def out_size(size, k, s, p, d):
        return (size + 2 * p - (d * (k - 1) + 1)) // s + 1
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    s, p, d = (pair(options.get(k, 1 if k != "padding" else 0)) for k in ("stride", "padding", "dilation"))
    oh, ow = out_size(h, kh, s[0], p[0], d[0]), out_size(w, kw, s[1], p[1], d[1])
    x = r.standard_normal((n, c, h, w))
    o = 1.5 * r.standard_normal((n, 2 * og * kh * kw, oh, ow))
    wt = r.standard_normal((4, c // groups, kh, kw))
    b = r.standard_normal(4)
    m = r.uniform(0.2, 1.0, (n, og * kh * kw, oh, ow)) if with_mask else None
    target = r.standard_normal((n, 4, oh, ow))
    batch_sharding = NamedSharding(mesh, P(batch_axis))

    def sharded(x, o, wt, b, m):
        return cj.deform_conv2d_sharded(x, o, wt, b, mask=m, mesh=mesh, batch_axis=batch_axis,
                                        **options)
    def plain(x, o, wt, b, m):
        return cj.deform_conv2d(x, o, wt, b, mask=m, **options)
    def loss(fn):
        return lambda *a: jnp.sum((fn(*a) - target) ** 2)

    argnums = (0, 1, 2, 3, 4) if with_mask else (0, 1, 2, 3)
    args_sharded = [jax.device_put(x, batch_sharding), jax.device_put(o, batch_sharding), wt, b,
                    None if m is None else jax.device_put(m, batch_sharding)]
    value_and_grad = jax.jit(jax.value_and_grad(loss(sharded), argnums=argnums))
    forward_fn = jax.jit(sharded)
    batches.clear()
    out = jax.block_until_ready(forward_fn(*args_sharded))
    value, grads = jax.block_until_ready(value_and_grad(*args_sharded))
    seen = sorted(set(batches))
    ref_out = plain(x, o, wt, b, m)
    ref_value, ref_grads = jax.value_and_grad(loss(plain), argnums=argnums)(x, o, wt, b, m)
    hlo = value_and_grad.lower(*args_sharded).compile().as_text()
    hlo_forward = forward_fn.lower(*args_sharded).compile().as_text()
    plain_hlo = jax.jit(jax.value_and_grad(loss(plain), argnums=argnums)).lower(
        *args_sharded).compile().as_text()
    results[case] = {
        "local_batches": seen,
        "expected_local_batch": n // mesh.shape[batch_axis],
        "batch_axis": batch_axis,
        "output_batch_sharding": str(out.sharding.spec[0]),
        "output_error": float(np.abs(np.asarray(out) - np.asarray(ref_out)).max()),
        "value_relative_error": float(abs(float(value) - float(ref_value)) / abs(float(ref_value))),
        "grad_relative_errors": [
            float(np.abs(np.asarray(g) - np.asarray(e)).max() / np.abs(np.asarray(e)).max())
            for g, e in zip(grads, ref_grads)],
        "grad_input_batch_sharding": str(grads[0].sharding.spec[0]),
        "all_gather_in_sharded_hlo": "all-gather" in hlo or "all-gather" in hlo_forward,
        "all_reduce_in_sharded_hlo": "all-reduce" in hlo,
        "all_gather_in_plain_hlo": "all-gather" in plain_hlo,
    }
errors = []
mesh = Mesh(np.array(jax.devices()), ("batch",))
for bad in (dict(batch_axis="data"), dict(n=12)):
    n = bad.pop("n", 16)
    try:
        cj.deform_conv2d_sharded(np.zeros((n, 2, 4, 4)), np.zeros((n, 18, 2, 2)),
                                 np.zeros((2, 2, 3, 3)), mesh=mesh, **bad)
    except cupydcn.CupydcnValueError as e:
        errors.append(str(e))
results["errors"] = errors
print("RESULTS " + json.dumps(results))
"""


def test_jax_batch_sharded_equals_unsharded():
    pytest.importorskip("jax")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", _JAX_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(lines[0][len("RESULTS ") :])
    assert [e.split(": ", 1)[1][:20] for e in results.pop("errors")] == [
        "batch_axis ['data'] ",
        "the batch (12) must ",
    ]
    for case, res in results.items():
        print(case, res)
        # every callback saw one device's shard of the batch, never the whole batch
        assert res["local_batches"] == [res["expected_local_batch"]], (case, res)
        # the output and the input gradient stay split along the batch
        assert res["output_batch_sharding"] == res["batch_axis"], (case, res)
        assert res["grad_input_batch_sharding"] == res["batch_axis"], (case, res)
        assert res["output_error"] <= 1e-12, (case, res)
        assert res["value_relative_error"] <= 1e-13, (case, res)
        assert max(res["grad_relative_errors"]) <= 1e-13, (case, res)
        # no all-gather of the inputs; the weight / bias gradients are all-reduced
        assert not res["all_gather_in_sharded_hlo"], (case, res)
        assert res["all_reduce_in_sharded_hlo"], (case, res)
