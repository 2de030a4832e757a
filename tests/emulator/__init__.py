"""CUDA-on-CPU test harness: runs the real ``cupydcn/cuda/kernels/`` sources on the host (see
``host_launcher.HostLauncher`` and ``cuda_shim.h``)."""
