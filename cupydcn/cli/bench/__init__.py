"""The measurement API shared by ``benchmarks/`` (the pytest-benchmark suite, see its
README) and ``python -m cupydcn bench`` (the quick command).

``benchmarks/`` imports these names from here and from nowhere else in this package
(``from cupydcn.cli import bench``); the modules behind them:

================  ==========================================================================
``shapes``        ops, passes, dtypes, mask variants; :class:`ConvShape`, :class:`RoiShape`,
                  :class:`PsRoiShape`, :class:`MsdaShape`, :class:`Dcnv3Shape`,
                  :class:`Dcnv4Shape`; the quick command's shapes; the deformable-attention
                  shapes (``ATTN_SHAPES``, ``ATTN_SHAPES_CPU``); :func:`flops_of`
``providers``     the providers of each op (cupydcn, torchvision, cuDNN conv2d, mmcv, the
                  grid_sample references of the deformable-attention family),
                  their labels and variants, :func:`skip_reason`, :func:`provider_note`
``device``        :func:`detect_device` (:class:`Device`), :func:`versions`,
                  :func:`import_peer`, :func:`thread_settings`, :class:`Unavailable`
``precision``     :func:`set_precision_switches`
``problems``      :func:`host_arrays`, :func:`make_problem` (:class:`Problem`)
``calls``         :func:`build_call`: one pass of one provider as a callable; the
                  grid_sample references :func:`msda_reference`, :func:`dcnv3_reference`,
                  :func:`dcnv4_reference`
``timing``        :class:`Timer`, :func:`warm_up`, :func:`measure`, :func:`gc_paused`,
                  :func:`peak_gemm`, :func:`peak_dtype`
``memory``        :func:`peak_extra_memory`
``record``        :func:`measurement_record`, :func:`run_one`
``report``        :func:`table_rows`, :func:`markdown_tables`, :func:`skipped_lines`,
                  :func:`shapes_legend`, :func:`order_of`, :func:`shape_sort_key`
``command``       :func:`run_bench`, the ``python -m cupydcn bench`` command
``..options``     :func:`positive_int`, :func:`non_negative_int` (``cupydcn.cli.options``):
                  the types of ``--rounds`` / ``--warmup`` here and of ``--bench-rounds`` /
                  ``--bench-warmup`` in ``benchmarks/``
================  ==========================================================================

One protocol for both:

- the device: CUDA when CuPy finds a device (cupydcn then gets PyTorch CUDA tensors when
  PyTorch has CUDA, the very tensors the peers get, else CuPy arrays), otherwise the CPU,
  where cupydcn runs its NumPy backend on scaled-down shapes and the GPU peers are skipped
  with the reason;
- time: CUDA events around each call on the stream the work runs on, synchronised inside
  the timed callable, after warm-up (which includes NVRTC compilation and cuDNN
  autotuning); ``time.perf_counter`` on the CPU; the median is reported;
- peak extra memory: the allocator high-water mark during one call minus what was
  allocated before it and minus the call's outputs (PyTorch's caching allocator plus
  CuPy's memory pool on a GPU, ``tracemalloc`` for NumPy on the CPU);
- precision switches set explicitly and recorded: TF32 off for every peer
  (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
  False), ``CUPY_TF32`` unset, cuDNN autotuning on;
- the device's peak: a large GEMM timed the same way; achieved TFLOP/s of a convolution
  count 2*N*C_out*H_out*W_out*(C_in/groups)*kh*kw per forward (twice that for the
  backward, three times for forward+backward);
- bfloat16 peers: the peers get the bfloat16 values upcast to float32, and the row says so.

Nothing here is imported by the ops; PyTorch, torchvision, mmcv and CuPy are imported
only when a measurement needs them.
"""

from ..options import non_negative_int, positive_int
from .calls import build_call, dcnv3_reference, dcnv4_reference, msda_reference
from .command import run_bench
from .device import Device, Unavailable, detect_device, import_peer, thread_settings, versions
from .memory import output_bytes, peak_extra_memory
from .precision import set_precision_switches
from .problems import Problem, host_arrays, make_problem, torch_dtype
from .providers import (
    ATTN_OPS,
    CONV_PROVIDERS,
    DCNV3_PROVIDERS,
    MSDA_PROVIDERS,
    PROVIDER_ORDER,
    PROVIDERS,
    PSROI_PROVIDERS,
    ROI_PROVIDERS,
    VARIANTLESS,
    provider_label,
    provider_note,
    skip_reason,
    variants_of,
)
from .record import measurement_record, run_one
from .report import (
    markdown_tables,
    order_of,
    shape_sort_key,
    shapes_legend,
    skipped_lines,
    table_rows,
)
from .shapes import (
    ATTN_SHAPES,
    ATTN_SHAPES_CPU,
    DTYPES,
    OPS,
    PASS_FLOP_FACTOR,
    PASSES,
    QUICK_SHAPES,
    QUICK_SHAPES_CPU,
    VARIANTS,
    ConvShape,
    Dcnv3Shape,
    Dcnv4Shape,
    MsdaShape,
    PsRoiShape,
    RoiShape,
    Shape,
    flops_of,
)
from .timing import Timer, gc_paused, measure, peak_dtype, peak_gemm, synchronize, warm_up

__all__ = [
    "ATTN_OPS",
    "ATTN_SHAPES",
    "ATTN_SHAPES_CPU",
    "CONV_PROVIDERS",
    "DCNV3_PROVIDERS",
    "DTYPES",
    "MSDA_PROVIDERS",
    "OPS",
    "PASSES",
    "PASS_FLOP_FACTOR",
    "PROVIDERS",
    "PROVIDER_ORDER",
    "PSROI_PROVIDERS",
    "QUICK_SHAPES",
    "QUICK_SHAPES_CPU",
    "ROI_PROVIDERS",
    "VARIANTLESS",
    "VARIANTS",
    "ConvShape",
    "Dcnv3Shape",
    "Dcnv4Shape",
    "Device",
    "MsdaShape",
    "Problem",
    "PsRoiShape",
    "RoiShape",
    "Shape",
    "Timer",
    "Unavailable",
    "build_call",
    "dcnv3_reference",
    "dcnv4_reference",
    "detect_device",
    "flops_of",
    "gc_paused",
    "host_arrays",
    "import_peer",
    "make_problem",
    "markdown_tables",
    "measure",
    "measurement_record",
    "msda_reference",
    "non_negative_int",
    "order_of",
    "positive_int",
    "output_bytes",
    "peak_dtype",
    "peak_extra_memory",
    "peak_gemm",
    "provider_label",
    "provider_note",
    "run_bench",
    "run_one",
    "set_precision_switches",
    "shape_sort_key",
    "shapes_legend",
    "skip_reason",
    "skipped_lines",
    "synchronize",
    "table_rows",
    "thread_settings",
    "torch_dtype",
    "variants_of",
    "versions",
    "warm_up",
]
