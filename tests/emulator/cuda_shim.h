// Host C++17 stand-ins for the CUDA built-ins that cupydcn's kernels use, so the real
// kernel sources (the code of cupydcn.cuda.kernel_source.module_source(file), unchanged) compile
// with g++ and run on the CPU. Used by tests/emulator/host_launcher.py, which appends the
// kernel source (with #line directives naming the cupydcn/cuda/kernels/ files) and generated extern
// "C" entry points to this header and builds a shared library.
//
// Execution model: cupydcn_emulation::launch runs every block and every thread of a 1-D
// launch one after another on the calling host thread, setting the thread-local threadIdx
// / blockIdx / blockDim / gridDim before each call of the kernel function. This is exact
// for kernels in which no thread reads what another thread of the same launch writes,
// except through atomics: the grid-stride kernels of cupydcn/cuda/kernels/ today. Atomics are
// therefore plain read-modify-writes. Float arithmetic is IEEE without FMA contraction
// (-ffp-contract=off) and without flushing subnormals, where NVRTC contracts by default and
// CuPy passes -ftz=true: results agree to rounding, not bit for bit, except in the
// explicitly rounded operations (__fadd_rn & co. below), which agree exactly; the kernels
// use those wherever a result decides a branch, a cell or a sample count.
//
// NOT SUPPORTED, on purpose a compile error rather than a wrong answer: __syncthreads,
// __syncwarp, __shared__ memory and warp shuffles. Sequential threads cannot meet at a
// barrier; a kernel that needs one makes the harness fail to build with a message naming
// this file. (A later extension would run the threads of each block as fibers /
// ucontext coroutines that yield at __syncthreads, with __shared__ arrays per block.)
//
// The half types are storage-only (a 16-bit pattern, like CUDA's __x member) with the
// exact CUDA conversion intrinsics; they deliberately have no arithmetic or implicit
// conversions, so a kernel must go through to_acc / from_acc as the dtype contract says.
#pragma once

#define CUPYDCN_HOST_EMULATION 1

#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
// __restrict__ is a GNU C++ keyword already; g++ accepts it as written.

// ---------------------------------------------------------------- math
// Device code calls these unqualified with float or double arguments and gets the overload
// of that precision (CUDA's math headers). Import the std overloads into the global
// namespace so float stays float on the host as well.
using std::abs;
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::isinf;
using std::isnan;
using std::log;
using std::max;
using std::min;
using std::round;
using std::sqrt;
using std::trunc;

// Explicitly rounded arithmetic (CUDA's __fadd_rn & co., used by cupydcn/cuda/kernels/rounding.cuh
// for the expressions that take discontinuous decisions). The device intrinsics are never
// contracted into FMAs, and this harness builds with -ffp-contract=off, so one IEEE
// operation each is what they compute. CuPy builds every RawModule with -ftz=true, under
// which the float intrinsics flush subnormal inputs and results to zero of the same sign:
// the float versions here do the same, so that both give the same bits. Double precision
// is never flushed.
namespace cupydcn_emulation {
inline float flush_subnormal(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}
}  // namespace cupydcn_emulation

#define CUPYDCN_EMULATION_ROUNDED(name, op)                           \
  inline float __f##name##_rn(float a, float b) {                     \
    using cupydcn_emulation::flush_subnormal;                         \
    return flush_subnormal(flush_subnormal(a) op flush_subnormal(b)); \
  }                                                                   \
  inline double __d##name##_rn(double a, double b) { return a op b; }
CUPYDCN_EMULATION_ROUNDED(add, +)
CUPYDCN_EMULATION_ROUNDED(sub, -)
CUPYDCN_EMULATION_ROUNDED(mul, *)
CUPYDCN_EMULATION_ROUNDED(div, /)
#undef CUPYDCN_EMULATION_ROUNDED

// ---------------------------------------------------------------- thread indices
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
// One set per host thread, so concurrent launches from several Python threads are safe.
static thread_local uint3 threadIdx;
static thread_local uint3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- atomics
// Threads run one at a time: a plain read-modify-write is atomic. Returns the old value,
// like CUDA.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old + value;
  return old;
}

// Read-only cache load: a plain load on the host.
template <typename T>
inline T __ldg(const T* address) {
  return *address;
}

// ---------------------------------------------------------------- unsupported on purpose
namespace cupydcn_emulation {
template <typename... T>
struct always_false : std::false_type {};
}  // namespace cupydcn_emulation

template <typename... T>
inline void __syncthreads(T...) {
  static_assert(cupydcn_emulation::always_false<T...>::value,
                "cupydcn host emulation (tests/emulator/cuda_shim.h): __syncthreads() is not "
                "supported, the threads of a block run sequentially and cannot meet at a "
                "barrier; extend the harness to run each block's threads as fibers");
}
template <typename... T>
inline void __syncwarp(T...) {
  static_assert(cupydcn_emulation::always_false<T...>::value,
                "cupydcn host emulation (tests/emulator/cuda_shim.h): __syncwarp() is not "
                "supported, threads run sequentially");
}
#define CUPYDCN_EMULATION_NO_SHUFFLE(name)                                                  \
  template <typename... T>                                                                  \
  inline int name(T...) {                                                                   \
    static_assert(cupydcn_emulation::always_false<T...>::value,                             \
                  "cupydcn host emulation (tests/emulator/cuda_shim.h): warp shuffles are " \
                  "not supported, threads run sequentially");                               \
    return 0;                                                                               \
  }
CUPYDCN_EMULATION_NO_SHUFFLE(__shfl_sync)
CUPYDCN_EMULATION_NO_SHUFFLE(__shfl_up_sync)
CUPYDCN_EMULATION_NO_SHUFFLE(__shfl_down_sync)
CUPYDCN_EMULATION_NO_SHUFFLE(__shfl_xor_sync)
#undef CUPYDCN_EMULATION_NO_SHUFFLE
#define __shared__                                                                           \
  static_assert(false,                                                                       \
                "cupydcn host emulation (tests/emulator/cuda_shim.h): __shared__ memory is " \
                "not supported, the threads of a block run sequentially; extend the "        \
                "harness to run each block's threads as fibers");

// ---------------------------------------------------------------- half types
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types");

namespace cupydcn_emulation {
inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace cupydcn_emulation

// binary16 -> binary32: exact (every half is a float). NaN keeps its sign and payload and
// is quieted (like x86's vcvtph2ps; CUDA leaves the NaN unspecified).
inline float __half2float(__half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.__x & 0x8000u) << 16;
  std::uint32_t exponent = (h.__x >> 10) & 0x1Fu;
  std::uint32_t mantissa = h.__x & 0x3FFu;
  std::uint32_t bits;
  if (exponent == 0x1Fu) {  // Inf / NaN
    bits = sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0u);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: m * 2^-24, normalise
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | ((mantissa & 0x3FFu) << 13);
  }
  return cupydcn_emulation::bits_float(bits);
}

// binary32 -> binary16, round to nearest, ties to even; overflow to +-Inf; subnormal
// results rounded correctly; NaN -> the canonical NaN 0x7FFF (what the CUDA intrinsic
// returns).
inline __half __float2half_rn(float f) {
  const std::uint32_t u = cupydcn_emulation::float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t magnitude = u & 0x7FFFFFFFu;
  __half h;
  if (magnitude > 0x7F800000u) {  // NaN
    h.__x = 0x7FFFu;
    return h;
  }
  if (magnitude >= 0x477FF000u) {  // >= 65520 = max half + half an ulp: rounds to Inf
    h.__x = static_cast<std::uint16_t>(sign | 0x7C00u);
    return h;
  }
  const std::uint32_t exponent = magnitude >> 23;  // biased binary32 exponent
  std::uint32_t result;
  if (exponent >= 113) {  // normal half: drop 13 mantissa bits with RNE
    const std::uint32_t rebased = magnitude - (112u << 23);
    result = (rebased + 0x0FFFu + ((rebased >> 13) & 1u)) >> 13;
  } else if (exponent >= 102) {  // subnormal half (or rounds up to the smallest normal)
    const std::uint32_t mant = (magnitude & 0x7FFFFFu) | 0x800000u;  // 24-bit significand
    const std::uint32_t shift = 126u - exponent;                     // 14 .. 24
    const std::uint32_t kept = mant >> shift;
    const std::uint32_t rest = mant & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    result = kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
  } else {  // below half the smallest subnormal (2^-25): rounds to zero
    result = 0;
  }
  h.__x = static_cast<std::uint16_t>(sign | result);
  return h;
}

// bfloat16 -> binary32: the upper half of the float's bits.
inline float __bfloat162float(__nv_bfloat16 b) {
  return cupydcn_emulation::bits_float(static_cast<std::uint32_t>(b.__x) << 16);
}

// binary32 -> bfloat16, round to nearest, ties to even (overflow rounds to Inf naturally);
// NaN -> the canonical NaN 0x7FFF (what the CUDA intrinsic returns).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const std::uint32_t u = cupydcn_emulation::float_bits(f);
  __nv_bfloat16 b;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    b.__x = 0x7FFFu;
    return b;
  }
  b.__x = static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return b;
}

// ---------------------------------------------------------------- launching
namespace cupydcn_emulation {

// Dtype name of a kernel parameter type, as the Python side spells it.
template <typename T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, double>) return "float64";
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, __half>) return "float16";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bfloat16";
  if constexpr (std::is_same_v<T, int>) return "int32";
  if constexpr (std::is_same_v<T, long long>) return "int64";
  if constexpr (std::is_same_v<T, unsigned int>) return "uint32";
  return "unsupported";  // the launcher's signature check then names the kernel
}

// "const float32*" / "float32*" / "int64" for one parameter type.
template <typename P>
std::string parameter_name() {
  if constexpr (std::is_pointer_v<P>) {
    using E = std::remove_pointer_t<P>;
    return std::string(std::is_const_v<E> ? "const " : "") + type_name<std::remove_cv_t<E>>() + "*";
  } else {
    return type_name<std::remove_cv_t<P>>();
  }
}

// The kernel's parameter list, comma-separated, for the launcher's argument checks.
template <typename... Args>
std::string signature(void (*)(Args...)) {
  std::string s;
  ((s += parameter_name<Args>() + ","), ...);
  if (!s.empty()) s.pop_back();
  return s;
}

// Flags of launch().
constexpr int kGuardFaults = 1;   // turn SIGSEGV / SIGBUS into a return code
constexpr int kReverseOrder = 2;  // run blocks and threads from the last to the first
constexpr int kShuffleOrder = 4;  // run blocks, and the threads of each block, in a
                                  // pseudo-random order seeded by flags >> kSeedShift
constexpr int kSeedShift = 8;

// The order in which a launch runs its blocks and threads: identity, reversed, or a
// seeded permutation (Fisher-Yates over a splitmix64 stream; another permutation per
// block for the threads).
struct LaunchOrder {
  int flags;
  unsigned long long state;

  explicit LaunchOrder(int f)
      : flags(f), state(0x9E3779B97F4A7C15ull * (static_cast<unsigned>(f) >> kSeedShift) + 1) {}

  unsigned long long next() {
    unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  std::vector<unsigned> order(unsigned n) {
    std::vector<unsigned> o(n);
    for (unsigned i = 0; i < n; ++i) o[i] = (flags & kReverseOrder) ? n - 1 - i : i;
    if (flags & kShuffleOrder) {
      for (unsigned i = n; i > 1; --i) std::swap(o[i - 1], o[next() % i]);
    }
    return o;
  }
};

// Run grid x block threads sequentially, in the order of `flags`; args[i] points at the
// value of parameter i (the cudaLaunchKernel convention).
template <typename... Args, std::size_t... Is>
void run_grid(void (*kernel)(Args...), unsigned grid, unsigned block, void** args, int flags,
              std::index_sequence<Is...>) {
  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(block, 1, 1);
  LaunchOrder order(flags);
  for (unsigned b : order.order(grid)) {
    blockIdx = uint3{b, 0, 0};
    for (unsigned t : order.order(block)) {
      threadIdx = uint3{t, 0, 0};
      kernel(*static_cast<Args*>(args[Is])...);
    }
  }
}

// A fault raised inside a guarded launch jumps back to the launch that installed it.
inline thread_local sigjmp_buf* fault_target = nullptr;
inline thread_local void* volatile fault_address = nullptr;
inline thread_local volatile int fault_signal = 0;

inline void on_fault(int signal, siginfo_t* info, void*) {
  if (fault_target == nullptr) {  // a fault outside a guarded launch: die as usual
    std::signal(signal, SIG_DFL);
    std::raise(signal);
    return;
  }
  fault_signal = signal;
  fault_address = info->si_addr;
  siglongjmp(*fault_target, 1);
}

// Runs the kernel over grid x block threads. Returns 0, or with kGuardFaults the number of
// the signal (SIGSEGV, SIGBUS) of a memory fault, its address in *address; the launch is
// then abandoned part-way. The handlers in place before are restored on return.
template <typename... Args>
int launch(void (*kernel)(Args...), unsigned grid, unsigned block, void** args, int flags,
           void** address) {
  if (!(flags & kGuardFaults)) {
    run_grid(kernel, grid, block, args, flags, std::index_sequence_for<Args...>{});
    return 0;
  }
  struct sigaction action, old_segv, old_bus;
  std::memset(&action, 0, sizeof action);
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &old_segv);
  sigaction(SIGBUS, &action, &old_bus);
  sigjmp_buf target;
  int result = 0;
  if (sigsetjmp(target, 1) == 0) {
    fault_target = &target;
    run_grid(kernel, grid, block, args, flags, std::index_sequence_for<Args...>{});
  } else {
    result = fault_signal;
    *address = fault_address;
  }
  fault_target = nullptr;
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  return result;
}

}  // namespace cupydcn_emulation
