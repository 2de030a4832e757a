"""pytest-benchmark configuration of the cupydcn benchmark suite (see README.md here).

The measuring core lives in the package ``cupydcn.cli.bench`` (shared with
``python -m cupydcn bench``; its docstring lists the API used here); this file wires it
into pytest:

- device detection once per session: CUDA when CuPy finds a device (cupydcn and the peers
  then get the same PyTorch CUDA tensors), else the CPU, where cupydcn's NumPy backend is
  timed on the scaled-down shapes of ``shapes.CPU`` (the deformable-attention family's:
  ``cupydcn.cli.bench.ATTN_SHAPES_CPU``) and every GPU provider is skipped with the
  reason;
- precision switches set before anything runs and recorded: TF32 off for all peers
  (``torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False``),
  ``CUPY_TF32`` unset, cuDNN autotuning on;
- each test: warm-up (compilation, autotuning), one untimed call measuring the peak extra
  memory, then ``benchmark.pedantic`` over a callable that records CUDA events around the
  call and synchronises inside it; ``benchmark.extra_info`` gets the GPU median
  (``gpu_median_ms``; ``median_ms`` on either device), the event times, the peak extra
  memory, the FLOP count and the provider's notes;
- the device's peak: a large GEMM timed the same way, once per session, written with the
  device, versions, precision switches and the skipped providers (with reasons) into the
  JSON's ``machine_info["cupydcn"]``.

Options: --bench-rounds, --bench-warmup, --bench-scale, --bench-cpu-peers.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest

import shapes
from cupydcn.cli import bench as _bench

SMOKE_HELP = "smoke: a short subset of the benchmark suite (CI runs it on the CPU)"
_SESSION = pytest.StashKey["BenchSession"]()


def pytest_addoption(parser):
    group = parser.getgroup("cupydcn benchmarks")
    group.addoption(
        "--bench-rounds",
        type=_bench.positive_int,
        default=None,
        help="timed calls per test, >= 1 (default: 50 on a GPU, 5 on the CPU)",
    )
    group.addoption(
        "--bench-warmup",
        type=_bench.non_negative_int,
        default=None,
        help="untimed calls before timing, >= 0 (default: 5 on a GPU, 1 on the CPU)",
    )
    group.addoption(
        "--bench-scale",
        choices=("auto", "full", "cpu"),
        default="auto",
        help="shapes: full size on a GPU and scaled down on the CPU (auto), or force one",
    )
    group.addoption(
        "--bench-cpu-peers",
        action="store_true",
        help="without a GPU, time PyTorch's CPU conv2d (and torchvision's CPU ops "
        "if importable) as peers instead of skipping them",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", SMOKE_HELP)
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError(
            "the cupydcn benchmarks need pytest-benchmark: pip install pytest-benchmark "
            "(it is in the 'test' extra)"
        )
    # Before anything imports CuPy or builds a graph: the switches hold for the session.
    switches, restore = _bench.set_precision_switches()
    config.stash[_SESSION] = BenchSession(config, switches, restore)


def pytest_unconfigure(config):
    session = config.stash.get(_SESSION, None)
    if session is not None:
        session.restore()


def pytest_benchmark_update_machine_info(config, machine_info):
    session = config.stash.get(_SESSION, None)
    if session is not None:
        machine_info["cupydcn"] = session.summary()


class BenchSession:
    """The session's device, options, GEMM peaks, skip log and input cache."""

    def __init__(self, config, switches: dict[str, Any], restore):
        self.config = config
        self.switches = switches
        self.restore = restore
        self._device: _bench.Device | None = None
        self._peaks: dict[str, dict] | None = None
        self.skipped: collections.Counter = collections.Counter()
        self._host: tuple[tuple[str, str], dict] | None = None
        self._problem: tuple[tuple, _bench.Problem] | None = None

    # -- options and device
    @property
    def device(self) -> _bench.Device:
        if self._device is None:
            self._device = _bench.detect_device()
        return self._device

    @property
    def gpu(self) -> bool:
        return self.device.kind == "cuda"

    @property
    def rounds(self) -> int:
        value = self.config.getoption("--bench-rounds")
        return value if value else (50 if self.gpu else 5)

    @property
    def warmup(self) -> int:
        value = self.config.getoption("--bench-warmup")
        return value if value is not None else (5 if self.gpu else 1)

    @property
    def scaled(self) -> bool:
        scale = self.config.getoption("--bench-scale")
        return scale == "cpu" or (scale == "auto" and not self.gpu)

    @property
    def cpu_peers(self) -> bool:
        return bool(self.config.getoption("--bench-cpu-peers"))

    # -- the device's peak, measured once (a large GEMM timed like the ops)
    def peaks(self) -> dict[str, dict]:
        if self._peaks is None:
            self._peaks = {}
            for dtype in _bench.DTYPES if self.gpu else ("float32",):
                try:
                    self._peaks[dtype] = _bench.peak_gemm(
                        self.device, dtype, rounds=self.rounds, warmup=self.warmup + 2
                    )
                except _bench.Unavailable as exc:
                    self._peaks[dtype] = {"not measured": str(exc)}
        return self._peaks

    def summary(self) -> dict[str, Any]:
        device = self.device
        skipped = collections.defaultdict(dict)
        for (provider, reason), count in sorted(self.skipped.items()):
            skipped[provider][reason] = count
        return {
            "device": dict(
                device.details,
                name=device.name,
                kind=device.kind,
                array_library=device.library,
                no_gpu_reason=device.no_gpu_reason,
            ),
            "versions": _bench.versions(),
            "precision": self.switches,
            "timer": device.timer,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "shapes": "scaled-down CPU versions (benchmarks/shapes.py CPU, "
            "cupydcn.cli.bench.ATTN_SHAPES_CPU)"
            if self.scaled
            else "full size (benchmarks/shapes.py FULL, cupydcn.cli.bench.ATTN_SHAPES)",
            "cpu_peers": self.cpu_peers,
            "peak_gemm": self._peaks or {},
            "skipped": dict(skipped),
        }

    # -- inputs: one problem cached at a time (tests are ordered shape, dtype, ...)
    def lookup(self, op: str, shape_id: str) -> _bench.Shape:
        """The shape of ``shape_id``: shapes.py's rows, or the deformable-attention family's
        (``cupydcn.cli.bench.ATTN_SHAPES`` / ``ATTN_SHAPES_CPU``)."""
        if op in _bench.ATTN_OPS:
            return (_bench.ATTN_SHAPES_CPU if self.scaled else _bench.ATTN_SHAPES)[shape_id]
        return shapes.lookup(shape_id, scaled=self.scaled)

    def problem(self, op: str, shape_id: str, dtype: str) -> _bench.Problem:
        shape = self.lookup(op, shape_id)
        key = (op, shape_id, dtype, self.scaled)
        if self._problem is not None and self._problem[0] == key:
            return self._problem[1]
        self._problem = None  # free the previous device arrays first
        if self._host is None or self._host[0] != (op, shape_id):
            self._host = None
            self._host = ((op, shape_id), _bench.host_arrays(shape))
        problem = _bench.make_problem(shape, dtype, self.device, self._host[1])
        self._problem = (key, problem)
        return problem

    def skip(self, provider: str, reason: str):
        self.skipped[(provider, reason)] += 1
        pytest.skip(reason)

    # -- one test
    def run(
        self, benchmark, op: str, shape_id: str, variant: str, dtype: str, pass_: str, provider: str
    ) -> None:
        device = self.device
        reason = _bench.skip_reason(op, provider, variant, device, self.cpu_peers)
        if reason:
            self.skip(provider, reason)
        self.peaks()  # measured before the first op, once
        try:
            problem = self.problem(op, shape_id, dtype)
            fn = _bench.build_call(problem, provider, variant, pass_)
            _bench.warm_up(fn, device, self.warmup)
            memory = _bench.peak_extra_memory(fn, device, tracked=provider == "cupydcn" or self.gpu)
        except _bench.Unavailable as exc:
            self.skip(provider, str(exc))
        except Exception as exc:
            if provider == "cupydcn":
                raise
            # A peer that cannot run this case (dtype, memory) is listed, not a failure.
            self.skip(provider, f"peer raised {type(exc).__name__}: {str(exc)[:200]}")
        timer = _bench.Timer(device)
        benchmark.group = f"{op} {shape_id} {variant} {dtype} {pass_}"
        with _bench.gc_paused():
            benchmark.pedantic(timer.wrap(fn), rounds=self.rounds, iterations=1, warmup_rounds=0)
        record = _bench.measurement_record(
            problem=problem,
            provider=provider,
            variant=variant,
            pass_=pass_,
            timer=timer,
            warmup=self.warmup,
            memory=memory,
        )
        record["scaled"] = self.scaled
        benchmark.extra_info.update(record)


@pytest.fixture(scope="session")
def bench(pytestconfig) -> BenchSession:
    return pytestconfig.stash[_SESSION]
