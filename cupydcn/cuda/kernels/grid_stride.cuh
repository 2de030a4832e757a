// The grid-stride loop of every kernel. Device code only.
#pragma once

// Grid-stride loop over [0, total) in the index type I (int or long long): launches may
// use fewer blocks than elements, and 64-bit sizes loop without overflow (the host picks
// 32-bit indices only while index + blockDim * gridDim cannot overflow,
// cupydcn/cuda/launch.py).
#define CUPYDCN_GRID_STRIDE_LOOP(index, I, total)                                                 \
  for (I index =                                                                                  \
           static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); \
       index < (total); index += static_cast<I>(blockDim.x) * static_cast<I>(gridDim.x))
