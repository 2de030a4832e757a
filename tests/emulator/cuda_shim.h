// Host C++17 stand-ins for the CUDA built-ins that cupydcn's kernels use, so the real
// kernel sources (the code of cupydcn.cuda.kernel_source.module_source(file), unchanged) compile
// with g++ and run on the CPU. Used by tests/emulator/host_launcher.py, which appends the
// kernel source (with #line directives naming the cupydcn/cuda/kernels/ files) and generated extern
// "C" entry points to this header and builds a shared library.
//
// Execution model. cupydcn_emulation::launch runs a (x, y, z) grid of (x, y, z) blocks on the
// calling host thread, one block after another, in one of two ways:
//
// * Sequential (source files that use no block-cooperative built-in; the Python side decides
//   per file by scanning its text): every thread of a block is one plain call of the kernel
//   function, one after another, with the thread-local threadIdx / blockIdx / blockDim /
//   gridDim set before each. Exact for kernels in which no thread reads what another thread of
//   the same launch writes except through atomics: the grid-stride kernels.
// * Cooperative (flag kCooperative): the threads of a block run as fibers, each on its own
//   stack (256 KiB, a PROT_NONE guard page below it, so an overflow faults instead of
//   overwriting a neighbour; a launch's stacks serve all its blocks, and are kept for later
//   launches).
//   A fiber runs until it reaches a barrier or a warp collective, or returns; the context
//   switch is a few instructions of assembly on x86-64 (callee-saved registers, MXCSR and the
//   x87 control word) and ucontext's swapcontext elsewhere (or with
//   -DCUPYDCN_EMULATION_UCONTEXT). When no fiber can run, the scheduler completes the warp
//   collectives whose lanes have all arrived, else releases a __syncthreads that every thread
//   of the block waits at, else reports the misuse (below). Within a block, fibers are resumed
//   in linear thread order (x fastest, then y, then z), reversed with kReverseOrder, or in a
//   fresh pseudo-random permutation after every barrier with kShuffleOrder: a read of another
//   thread's shared-memory write with no barrier in between then sees different values in
//   different orders (tests/emulator/host_launcher.py: assert_order_independent).
//
// Block-cooperative built-ins (cooperative launches only):
// * __shared__ is `static thread_local`: a block's fibers share one host thread and blocks run
//   one after another, so that is per-block storage. At every block start the launch fills
//   the module's thread-local block with 0xFF bytes (a NaN in every float dtype), everything
//   but the shim's own thread-locals, so a shared value read before any thread wrote it shows.
//   Kernel sources therefore must not declare thread_local variables of their own.
//   `extern __shared__` (dynamic shared memory) is NOT SUPPORTED: the launcher protocol has no
//   dynamic shared-memory size; host_launcher.py refuses such a source before compiling it.
// * __syncthreads, __syncthreads_count / _and / _or: every thread of the block must wait at the
//   same barrier (same kind, same source line).
// * Warp collectives: a warp is 32 consecutive linear thread ids. __syncwarp, __shfl_sync,
//   __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (any trivially copyable type of up to 8
//   bytes, with `width`), __ballot_sync, __any_sync, __all_sync, __match_any_sync,
//   __match_all_sync, __reduce_{add,min,max}_sync (int, unsigned), __reduce_{and,or,xor}_sync
//   (unsigned). Each is a rendezvous: every lane named in the mask must arrive at the same
//   intrinsic with the same mask (stricter than CUDA, which lets a mask name exited lanes: a
//   value read from one is undefined). Values follow PTX exactly: the source lane of
//   shfl.idx / up / down / bfly is computed per width segment, an out-of-range one returns the
//   caller's own value; a source lane that is not in the mask (its value undefined on a GPU)
//   gives all-ones bits (NaN). __activemask() returns the lanes of the caller's warp that have
//   not exited (the emulator does not model divergence; do not build a shuffle mask from it in
//   divergent code).
// * __threadfence(), __threadfence_block() and __launch_bounds__(...) are no-ops.
// * Misuse is an error returned by the launch (kMisuse, with a message naming the block, the
//   thread, the built-in and its source line), never a hang: a barrier that some thread of the
//   block does not reach (it exited, or waits at another barrier or at a warp collective), a
//   warp collective whose mask names a lane that does not exist, has exited or waits
//   elsewhere, a mask without the calling lane, a width that is not a power of two up to 32,
//   or a cooperative built-in reached in a sequential launch.
//
// Atomics are plain read-modify-writes (threads and fibers switch only at barriers and
// collectives). Float arithmetic is IEEE without FMA contraction (-ffp-contract=off) and
// without flushing subnormals, where NVRTC contracts by default and CuPy passes -ftz=true:
// results agree to rounding, not bit for bit, except in the explicitly rounded operations
// (__fadd_rn & co. below), which agree exactly; the kernels use those wherever a result
// decides a branch, a cell or a sample count.
//
// Memory faults (kGuardFaults): SIGSEGV / SIGBUS jump back to the launch, which returns the
// signal and the address; in a cooperative launch the handler runs on an alternate signal
// stack, so a fiber's stack overflow is caught too (and reported as one). UBSan works
// unchanged. ASan (-fsanitize=address): the fiber switches carry its annotations
// (__sanitizer_start_switch_fiber / _finish_switch_fiber) and a stack is unpoisoned before a
// new fiber starts on it.
//
// The half types are storage-only (a 16-bit pattern, like CUDA's __x member) with the
// exact CUDA conversion intrinsics; they deliberately have no arithmetic or implicit
// conversions, so a kernel must go through to_acc / from_acc as the dtype contract says.
#pragma once

#define CUPYDCN_HOST_EMULATION 1

#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(CUPYDCN_EMULATION_UCONTEXT)
#define CUPYDCN_EMULATION_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUPYDCN_EMULATION_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom,
                                               std::size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                std::size_t* size_old);
extern "C" void __asan_unpoison_memory_region(const volatile void* address, std::size_t size);
#endif

// Everything below has hidden visibility, and host_launcher.py compiles the kernel source the
// same way: a library then has no symbol another one could bind to. (Default-visibility
// function-local statics of templates, such as a kernel template's __shared__ arrays, are
// STB_GNU_UNIQUE: one object for every library of the process, whichever loaded first.)
#pragma GCC visibility push(hidden)

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
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
// Threads run one at a time and switch only at barriers and warp collectives: a plain
// read-modify-write is atomic, on global and on shared memory. Each returns the old value,
// like CUDA.
#define CUPYDCN_EMULATION_ATOMIC(name, type, update) \
  inline type name(type* address, type value) {      \
    const type old = *address;                       \
    *address = (update);                             \
    return old;                                      \
  }
CUPYDCN_EMULATION_ATOMIC(atomicAdd, float, old + value)
CUPYDCN_EMULATION_ATOMIC(atomicAdd, double, old + value)
CUPYDCN_EMULATION_ATOMIC(atomicAdd, int, old + value)
CUPYDCN_EMULATION_ATOMIC(atomicAdd, unsigned int, old + value)
CUPYDCN_EMULATION_ATOMIC(atomicAdd, unsigned long long, old + value)
CUPYDCN_EMULATION_ATOMIC(atomicSub, int, old - value)
CUPYDCN_EMULATION_ATOMIC(atomicSub, unsigned int, old - value)
CUPYDCN_EMULATION_ATOMIC(atomicExch, int, value)
CUPYDCN_EMULATION_ATOMIC(atomicExch, unsigned int, value)
CUPYDCN_EMULATION_ATOMIC(atomicExch, float, value)
CUPYDCN_EMULATION_ATOMIC(atomicMin, int, value < old ? value : old)
CUPYDCN_EMULATION_ATOMIC(atomicMin, unsigned int, value < old ? value : old)
CUPYDCN_EMULATION_ATOMIC(atomicMax, int, value > old ? value : old)
CUPYDCN_EMULATION_ATOMIC(atomicMax, unsigned int, value > old ? value : old)
#undef CUPYDCN_EMULATION_ATOMIC
#define CUPYDCN_EMULATION_CAS(type)                                \
  inline type atomicCAS(type* address, type compare, type value) { \
    const type old = *address;                                     \
    if (old == compare) *address = value;                          \
    return old;                                                    \
  }
CUPYDCN_EMULATION_CAS(int)
CUPYDCN_EMULATION_CAS(unsigned int)
CUPYDCN_EMULATION_CAS(unsigned long long)
#undef CUPYDCN_EMULATION_CAS

// Read-only cache load: a plain load on the host.
template <typename T>
inline T __ldg(const T* address) {
  return *address;
}

// Memory fences order a thread's accesses for other threads; fibers switch only at barriers
// and collectives, so there is nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---------------------------------------------------------------- bit manipulation
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

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

// ---------------------------------------------------------------- launch state
namespace cupydcn_emulation {

// Flags of launch().
constexpr int kGuardFaults = 1;   // turn SIGSEGV / SIGBUS into a return code
constexpr int kReverseOrder = 2;  // run blocks and threads from the last to the first
constexpr int kShuffleOrder = 4;  // run blocks, and the threads of each block, in a
                                  // pseudo-random order seeded by flags >> kSeedShift
constexpr int kCooperative = 8;   // run each block's threads as fibers (barriers, shared
                                  // memory, warp collectives)
constexpr int kSeedShift = 8;

// launch() result besides 0 and a signal number: an error the emulator detected, described
// in the message buffer.
constexpr int kMisuse = -1;

constexpr std::size_t kFiberStackBytes = 256 * 1024;
constexpr std::size_t kSignalStackBytes = 64 * 1024;

// The order in which a launch runs its blocks and threads: identity, reversed, or a
// seeded permutation (Fisher-Yates over a splitmix64 stream; another permutation per
// block, and in a cooperative launch after every barrier, for the threads).
struct LaunchOrder {
  int flags;
  unsigned long long state;

  explicit LaunchOrder(int f)
      : flags(f), state(0x9E3779B97F4A7C15ull * (static_cast<unsigned>(f) >> kSeedShift) + 1) {}

  bool shuffled() const { return (flags & kShuffleOrder) != 0; }

  unsigned long long next() {
    unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  // Fills o (its size is the count) with this launch's order of 0 .. o.size() - 1.
  void fill(std::vector<unsigned>& o) {
    const unsigned n = static_cast<unsigned>(o.size());
    for (unsigned i = 0; i < n; ++i) o[i] = (flags & kReverseOrder) ? n - 1 - i : i;
    if (shuffled()) {
      for (unsigned i = n; i > 1; --i) std::swap(o[i - 1], o[next() % i]);
    }
  }
};

// (x, y, z) of a linear index, x fastest.
inline uint3 decode(unsigned linear, const dim3& extent) {
  if (extent.y == 1 && extent.z == 1) return uint3{linear, 0, 0};
  return uint3{linear % extent.x, (linear / extent.x) % extent.y, linear / (extent.x * extent.y)};
}

// ---- context switching
#if defined(CUPYDCN_EMULATION_USE_UCONTEXT)
struct Context {
  ucontext_t context;
};
inline void prepare_context(Context& c, char* low, std::size_t size, void (*entry)()) {
  getcontext(&c.context);
  c.context.uc_stack.ss_sp = low;
  c.context.uc_stack.ss_size = size;
  c.context.uc_link = nullptr;
  makecontext(&c.context, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#else
// cupydcn_emulation_switch(save, load): pushes the callee-saved registers, MXCSR and the x87
// control word, stores the stack pointer to *save, loads `load` as the stack pointer and pops
// the same from it, then returns into the context that was saved there.
extern "C" __attribute__((visibility("hidden"))) void cupydcn_emulation_switch(void** save,
                                                                               void* load);
asm(R"(
  .pushsection .text
  .p2align 4
  .globl cupydcn_emulation_switch
  .hidden cupydcn_emulation_switch
  .type cupydcn_emulation_switch, @function
cupydcn_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cupydcn_emulation_switch, .-cupydcn_emulation_switch
  .popsection
)");
struct Context {
  void* sp = nullptr;
};
// A context that starts `entry` (which must never return) at the top of [low, low + size):
// the frame cupydcn_emulation_switch pops, zeroed registers and this thread's MXCSR and x87
// control word, returning into `entry` with the stack aligned as after a call.
inline void prepare_context(Context& c, char* low, std::size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::uintptr_t>(low + size) &
                                               ~std::uintptr_t{15});
  unsigned int mxcsr = 0;
  unsigned short control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(control));
  top[-1] = 0;  // entry's return address: it never returns
  top[-2] = reinterpret_cast<std::uint64_t>(entry);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;  // rbp, rbx, r12 .. r15
  top[-9] = mxcsr | (static_cast<std::uint64_t>(control) << 32);
  c.sp = top - 9;
}
inline void switch_context(Context& from, Context& to) {
  cupydcn_emulation_switch(&from.sp, to.sp);
}
#endif

// ---- fibers
enum FiberState : unsigned char { kReady, kAtBarrier, kAtWarp, kDone, kFailed };

// The block barriers and warp collectives, as a fiber records what it waits at.
enum Collective : unsigned char {
  kSyncThreads,
  kSyncThreadsCount,
  kSyncThreadsAnd,
  kSyncThreadsOr,
  kSyncWarp,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kMatchAll,
  kReduceAdd,
  kReduceMin,
  kReduceMax,
  kReduceAnd,
  kReduceOr,
  kReduceXor,
  kActiveMask,  // not a rendezvous; named in messages only
};

inline const char* collective_name(int op) {
  static const char* const names[] = {
      "__syncthreads",     "__syncthreads_count", "__syncthreads_and", "__syncthreads_or",
      "__syncwarp",        "__shfl_sync",         "__shfl_up_sync",    "__shfl_down_sync",
      "__shfl_xor_sync",   "__ballot_sync",       "__any_sync",        "__all_sync",
      "__match_any_sync",  "__match_all_sync",    "__reduce_add_sync", "__reduce_min_sync",
      "__reduce_max_sync", "__reduce_and_sync",   "__reduce_or_sync",  "__reduce_xor_sync",
      "__activemask"};
  return names[op];
}

struct Fiber {
  Context context;
  char* stack_low = nullptr;
  unsigned char state = kDone;
  unsigned char op = 0;    // what it waits at (Collective)
  unsigned char size = 0;  // bytes of `value` (warp collectives)
  bool is_signed = false;  // __reduce_min/max_sync of int
  unsigned int mask = 0;   // warp collectives
  int operand = 0;         // source lane, delta or lane mask of a shuffle
  int width = 32;          // shuffle segment width
  unsigned long long value = 0;
  unsigned long long result = 0;
  const char* file = "";
  int line = 0;
};

// The fiber stacks of a launch, one mapping: the signal stack, then [guard page][stack] per
// thread. Mapping and protecting them costs more than most launches, so a launch takes one
// from a small cache (per library) and puts it back for the next.
struct StackPool {
  char* base = nullptr;
  std::size_t length = 0;
  std::size_t stride = 0;
  unsigned capacity = 0;  // fibers

  char* signal_stack() const { return base; }
  char* low(unsigned i) const {
    return base + kSignalStackBytes + i * stride + (stride - kFiberStackBytes);
  }
  bool holds(const void* address) const {
    const char* a = static_cast<const char*>(address);
    return a >= base + kSignalStackBytes && a < base + length;
  }
};

inline void unmap_pool(StackPool* pool) {
#if defined(CUPYDCN_EMULATION_ASAN)
  __asan_unpoison_memory_region(pool->base, pool->length);
#endif
  munmap(pool->base, pool->length);
  delete pool;
}

// Maps a pool for `capacity` fibers; nullptr when the system refuses.
inline StackPool* map_pool(unsigned capacity) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  auto* pool = new StackPool;
  pool->capacity = capacity;
  pool->stride = page + kFiberStackBytes;
  pool->length = kSignalStackBytes + pool->stride * capacity;
  void* mapped = mmap(nullptr, pool->length, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapped == MAP_FAILED) {
    delete pool;
    return nullptr;
  }
  pool->base = static_cast<char*>(mapped);
  for (unsigned i = 0; i < capacity; ++i) {
    if (mprotect(pool->low(i) - page, page, PROT_NONE) != 0) {
      unmap_pool(pool);
      return nullptr;
    }
  }
  return pool;
}

struct PoolCache {
  std::atomic_flag busy = ATOMIC_FLAG_INIT;
  StackPool* pools[8] = {};
};
static PoolCache pool_cache;

// A pool of at least `threads` fibers: a cached one, or a new one (rounded up to a power of
// two, at least 32).
inline StackPool* acquire_pool(unsigned threads) {
  StackPool* found = nullptr;
  while (pool_cache.busy.test_and_set(std::memory_order_acquire)) {}
  for (StackPool*& pool : pool_cache.pools) {
    if (pool != nullptr && pool->capacity >= threads &&
        (found == nullptr || pool->capacity < found->capacity)) {
      std::swap(pool, found);  // take it, leaving the previous best (if any) in its slot
    }
  }
  pool_cache.busy.clear(std::memory_order_release);
  if (found != nullptr) return found;
  unsigned capacity = 32;
  while (capacity < threads) capacity *= 2;
  return map_pool(capacity);
}

inline void release_pool(StackPool* pool) {
#if defined(CUPYDCN_EMULATION_ASAN)
  __asan_unpoison_memory_region(pool->base, pool->length);
#endif
  while (pool_cache.busy.test_and_set(std::memory_order_acquire)) {}
  for (StackPool*& slot : pool_cache.pools) {
    if (slot == nullptr) std::swap(slot, pool);
    if (pool == nullptr) break;
  }
  pool_cache.busy.clear(std::memory_order_release);
  if (pool != nullptr) unmap_pool(pool);  // the cache is full
}

// Everything of one launch. It lives in launch()'s frame; thread_state points at it.
struct Launch {
  dim3 grid, block;
  unsigned blocks = 0;   // gridDim.x * y * z
  unsigned threads = 0;  // blockDim.x * y * z
  LaunchOrder order;
  std::vector<unsigned> block_order;   // filled only for shuffled orders
  std::vector<unsigned> thread_order;  // of the current block, or pass of a cooperative block
  char* message;
  std::size_t message_size;
  bool failed = false;
  // cooperative launches
  std::vector<Fiber> fibers;
  StackPool* stacks = nullptr;
  Context scheduler;
  unsigned current = 0;                   // the fiber running
  void (*invoke)(const void*) = nullptr;  // calls the kernel with the launch's arguments
  const void* payload = nullptr;
  const void* scheduler_stack = nullptr;  // ASan: the launching stack
  std::size_t scheduler_stack_size = 0;

  Launch(int flags, char* m, std::size_t size) : order(flags), message(m), message_size(size) {}
  ~Launch() {
    if (stacks != nullptr) release_pool(stacks);
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;
};

// The shim's thread-local state besides the four index variables (kept in one object so the
// shared-memory poisoning can leave it alone). Like them it has internal linkage: an inline
// variable would be one object for every library of the process (STB_GNU_UNIQUE).
struct ThreadState {
  sigjmp_buf* volatile fault_target;  // the running launch's jump target
  void* volatile fault_address;
  volatile int fault_signal;
  Launch* launch;
};
static thread_local ThreadState thread_state;

// Writes "block (x, y, z), thread (x, y, z): <text>" to the launch's message and marks it
// failed.
inline void vreport(Launch& l, const uint3& thread, const char* format, std::va_list args) {
  l.failed = true;
  if (l.message == nullptr || l.message_size == 0) return;
  int used = std::snprintf(l.message, l.message_size,
                           "block (%u, %u, %u), thread (%u, %u, %u): ", blockIdx.x, blockIdx.y,
                           blockIdx.z, thread.x, thread.y, thread.z);
  if (used < 0) used = 0;
  if (static_cast<std::size_t>(used) < l.message_size) {
    std::vsnprintf(l.message + used, l.message_size - used, format, args);
  }
}
// Writes <text> alone (errors of the launch as a whole).
__attribute__((format(printf, 2, 3))) inline void report_launch(Launch& l, const char* format,
                                                                ...) {
  l.failed = true;
  if (l.message == nullptr || l.message_size == 0) return;
  std::va_list args;
  va_start(args, format);
  std::vsnprintf(l.message, l.message_size, format, args);
  va_end(args);
}
__attribute__((format(printf, 3, 4))) inline void report(Launch& l, const uint3& thread,
                                                         const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  vreport(l, thread, format, args);
  va_end(args);
}

// A cooperative built-in outside a cooperative launch: report and leave the launch, or abort
// when no launch is running.
[[noreturn]] inline void not_cooperative(const char* name, const char* file, int line) {
  Launch* l = thread_state.launch;
  const char* text =
      "%s at %s:%d in a launch without fibers: tests/emulator/host_launcher.py decides per source "
      "file, by scanning it for the cooperative built-ins, whether its kernels run as fibers";
  if (l == nullptr || thread_state.fault_target == nullptr) {
    std::fprintf(stderr, "cupydcn emulation: ");
    std::fprintf(stderr, text, name, file, line);
    std::fprintf(stderr, "\n");
    std::abort();
  }
  report(*l, threadIdx, text, name, file, line);
  siglongjmp(*thread_state.fault_target, 2);
}

// ---- fiber side
inline void yield_to_scheduler(Launch& l, Fiber& f) {
#if defined(CUPYDCN_EMULATION_ASAN)
  void* fake_stack = nullptr;
  const bool finished = f.state == kDone || f.state == kFailed;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, l.scheduler_stack,
                                 l.scheduler_stack_size);
  switch_context(f.context, l.scheduler);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  switch_context(f.context, l.scheduler);
#endif
}

[[noreturn]] inline void fiber_entry() {
  Launch& l = *thread_state.launch;
#if defined(CUPYDCN_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_size);
#endif
  Fiber& f = l.fibers[l.current];
  l.invoke(l.payload);
  f.state = kDone;
  yield_to_scheduler(l, f);
  std::abort();  // a finished fiber is never resumed
}

// Reports a misuse detected in the running fiber and leaves it for good.
[[noreturn]] __attribute__((format(printf, 3, 4))) inline void fail_in_fiber(Launch& l, Fiber& f,
                                                                             const char* format,
                                                                             ...) {
  std::va_list args;
  va_start(args, format);
  vreport(l, threadIdx, format, args);
  va_end(args);
  f.state = kFailed;
  yield_to_scheduler(l, f);
  std::abort();  // a failed launch is abandoned
}

inline Launch& cooperative_launch(int op, const char* file, int line) {
  Launch* l = thread_state.launch;
  if (l == nullptr || l->fibers.empty()) not_cooperative(collective_name(op), file, line);
  return *l;
}

inline unsigned long long block_barrier(int op, int predicate, const char* file, int line) {
  Launch& l = cooperative_launch(op, file, line);
  Fiber& f = l.fibers[l.current];
  f.state = kAtBarrier;
  f.op = static_cast<unsigned char>(op);
  f.value = predicate != 0;
  f.file = file;
  f.line = line;
  yield_to_scheduler(l, f);
  return f.result;
}

inline bool is_shuffle(int op) { return op >= kShflIdx && op <= kShflXor; }

inline unsigned long long warp_collective(int op, unsigned mask, unsigned long long value, int size,
                                          bool is_signed, int operand, int width, const char* file,
                                          int line) {
  Launch& l = cooperative_launch(op, file, line);
  Fiber& f = l.fibers[l.current];
  const unsigned lane = l.current % warpSize;
  if (((mask >> lane) & 1u) == 0) {
    fail_in_fiber(l, f, "%s at %s:%d: mask 0x%08x does not name the calling lane %u",
                  collective_name(op), file, line, mask, lane);
  }
  if (is_shuffle(op) && (width < 1 || width > warpSize || (width & (width - 1)) != 0)) {
    fail_in_fiber(l, f, "%s at %s:%d: width %d is not a power of two in 1 .. 32",
                  collective_name(op), file, line, width);
  }
  f.state = kAtWarp;
  f.op = static_cast<unsigned char>(op);
  f.mask = mask;
  f.value = value;
  f.size = static_cast<unsigned char>(size);
  f.is_signed = is_signed;
  f.operand = operand;
  f.width = width;
  f.file = file;
  f.line = line;
  yield_to_scheduler(l, f);
  return f.result;
}

// The lanes of the caller's warp that exist and have not exited.
inline unsigned active_mask(const char* file, int line) {
  Launch& l = cooperative_launch(kActiveMask, file, line);
  const unsigned base = l.current - l.current % warpSize;
  unsigned mask = 0;
  for (unsigned lane = 0; lane < 32 && base + lane < l.threads; ++lane) {
    const unsigned char state = l.fibers[base + lane].state;
    if (state != kDone && state != kFailed) mask |= 1u << lane;
  }
  return mask;
}

template <typename T>
unsigned long long to_bits(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "cupydcn host emulation: warp collectives take trivially copyable values of at "
                "most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(unsigned long long bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
template <typename T>
T shuffle(int op, unsigned mask, T var, int operand, int width, const char* file, int line) {
  return from_bits<T>(
      warp_collective(op, mask, to_bits(var), sizeof(T), false, operand, width, file, line));
}

// ---- scheduler side
inline void resume(Launch& l, unsigned i) {
  l.current = i;
  threadIdx = decode(i, blockDim);
  Fiber& f = l.fibers[i];
#if defined(CUPYDCN_EMULATION_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack_low, kFiberStackBytes);
  switch_context(l.scheduler, f.context);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  switch_context(l.scheduler, f.context);
#endif
}

inline unsigned long long all_ones(int size) {
  return size >= 8 ? ~0ull : (1ull << (8 * size)) - 1;
}

// The lane a shuffle lane reads from, as PTX's shfl.sync computes it (c = ((32 - width) << 8)
// | clamp, clamp 0 for .up and 31 otherwise); an out-of-range source is the lane itself.
inline unsigned shuffle_source(int op, unsigned lane, int operand, int width) {
  const int segment = 32 - width;  // segmask: the lane bits that select the segment
  const int b = operand & 31;
  const int self = static_cast<int>(lane);
  const int first = self & segment;
  const int last = first | (31 & ~segment);
  int j = self;
  bool valid = false;
  switch (op) {
    case kShflUp:
      j = self - b;
      valid = j >= first;
      break;
    case kShflDown:
      j = self + b;
      valid = j <= last;
      break;
    case kShflXor:
      j = self ^ b;
      valid = j <= last;
      break;
    default:  // kShflIdx
      j = first | (b & ~segment);
      valid = j <= last;
      break;
  }
  return static_cast<unsigned>(valid ? j : self);
}

// Completes one warp collective whose lanes (base + the bits of mask) have all arrived.
inline void complete_warp_group(Launch& l, unsigned base, unsigned mask, int op) {
  Fiber* lanes = &l.fibers[base];
  unsigned ballot = 0;
  unsigned long long sum = 0, smallest = ~0ull, largest = 0, all_and = ~0ull, any_or = 0,
                     any_xor = 0;
  long long signed_min = 0, signed_max = 0;
  bool first = true, all_equal = true;
  for (unsigned m = mask; m != 0; m &= m - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(m));
    const Fiber& f = lanes[lane];
    if (f.value != 0) ballot |= 1u << lane;
    const unsigned long long v = f.value & 0xFFFFFFFFull;
    const long long s = static_cast<int>(static_cast<unsigned>(v));
    sum += v;
    smallest = std::min(smallest, v);
    largest = std::max(largest, v);
    all_and &= v;
    any_or |= v;
    any_xor ^= v;
    signed_min = first ? s : std::min(signed_min, s);
    signed_max = first ? s : std::max(signed_max, s);
    if (!first && f.value != lanes[__builtin_ctz(mask)].value) all_equal = false;
    first = false;
  }
  for (unsigned m = mask; m != 0; m &= m - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(m));
    Fiber& f = lanes[lane];
    unsigned long long r = 0;
    switch (op) {
      case kShflIdx:
      case kShflUp:
      case kShflDown:
      case kShflXor: {
        const unsigned source = shuffle_source(op, lane, f.operand, f.width);
        r = ((mask >> source) & 1u) ? lanes[source].value : all_ones(f.size);
        break;
      }
      case kBallot:
        r = ballot;
        break;
      case kAny:
        r = ballot != 0;
        break;
      case kAll:
        r = ballot == mask;
        break;
      case kMatchAny: {
        unsigned same = 0;
        for (unsigned n = mask; n != 0; n &= n - 1) {
          const unsigned other = static_cast<unsigned>(__builtin_ctz(n));
          if (lanes[other].value == f.value) same |= 1u << other;
        }
        r = same;
        break;
      }
      case kMatchAll:
        r = all_equal ? (mask | (1ull << 32)) : 0;
        break;
      case kReduceAdd:
        r = sum & 0xFFFFFFFFull;
        break;
      case kReduceMin:
        r = f.is_signed ? static_cast<unsigned>(static_cast<int>(signed_min)) : smallest;
        break;
      case kReduceMax:
        r = f.is_signed ? static_cast<unsigned>(static_cast<int>(signed_max)) : largest;
        break;
      case kReduceAnd:
        r = all_and;
        break;
      case kReduceOr:
        r = any_or;
        break;
      case kReduceXor:
        r = any_xor;
        break;
      default:
        break;  // kSyncWarp
    }
    f.result = r;
  }
  for (unsigned m = mask; m != 0; m &= m - 1) lanes[__builtin_ctz(m)].state = kReady;
}

// Whether lane j (a fiber index) takes part in the collective fiber f waits at.
inline bool joins(const Launch& l, unsigned j, const Fiber& f) {
  if (j >= l.threads) return false;
  const Fiber& g = l.fibers[j];
  return g.state == kAtWarp && g.op == f.op && g.mask == f.mask && g.size == f.size;
}

// Completes every warp collective whose named lanes have all arrived; whether any did.
inline bool complete_warp_groups(Launch& l) {
  bool progressed = false;
  for (unsigned i = 0; i < l.threads; ++i) {
    const Fiber& f = l.fibers[i];
    if (f.state != kAtWarp) continue;
    const unsigned base = i - i % warpSize;
    bool complete = true;
    for (unsigned m = f.mask; m != 0 && complete; m &= m - 1) {
      complete = joins(l, base + static_cast<unsigned>(__builtin_ctz(m)), f);
    }
    if (complete) {
      complete_warp_group(l, base, f.mask, f.op);
      progressed = true;
    }
  }
  return progressed;
}

// Reports why the warp collective fiber i waits at cannot complete.
inline void report_stuck_collective(Launch& l, unsigned i) {
  const Fiber& f = l.fibers[i];
  const uint3 thread = decode(i, blockDim);
  const unsigned base = i - i % warpSize;
  for (unsigned m = f.mask; m != 0; m &= m - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(m));
    const unsigned j = base + lane;
    if (joins(l, j, f)) continue;
    const char* name = collective_name(f.op);
    if (j >= l.threads) {
      report(l, thread,
             "%s with mask 0x%08x at %s:%d names lane %u, which does not exist (the block has "
             "%u threads)",
             name, f.mask, f.file, f.line, lane, l.threads);
      return;
    }
    const Fiber& g = l.fibers[j];
    const uint3 other = decode(j, blockDim);
    if (g.state == kDone) {
      report(l, thread,
             "%s with mask 0x%08x at %s:%d names lane %u (thread (%u, %u, %u)), which has exited",
             name, f.mask, f.file, f.line, lane, other.x, other.y, other.z);
    } else if (g.state == kAtWarp) {
      report(l, thread,
             "%s with mask 0x%08x at %s:%d names lane %u (thread (%u, %u, %u)), which waits at "
             "%s with mask 0x%08x%s at %s:%d",
             name, f.mask, f.file, f.line, lane, other.x, other.y, other.z, collective_name(g.op),
             g.mask, g.size != f.size ? " on a value of another size" : "", g.file, g.line);
    } else {
      report(l, thread,
             "%s with mask 0x%08x at %s:%d names lane %u (thread (%u, %u, %u)), which waits at "
             "%s at %s:%d",
             name, f.mask, f.file, f.line, lane, other.x, other.y, other.z, collective_name(g.op),
             g.file, g.line);
    }
    return;
  }
  report(l, thread, "%s at %s:%d cannot complete", collective_name(f.op), f.file, f.line);
}

inline bool same_site(const Fiber& a, const Fiber& b) {
  return a.op == b.op && a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// No fiber can run and no warp collective can complete: releases the block barrier every live
// fiber waits at (1), finds the block finished (0), or reports why it is stuck (-1).
inline int release_block_barrier(Launch& l) {
  unsigned waiting = l.threads;
  for (unsigned i = 0; i < l.threads; ++i) {
    const unsigned char state = l.fibers[i].state;
    if (state == kAtWarp) {
      report_stuck_collective(l, i);
      return -1;
    }
    if (state == kAtBarrier && waiting == l.threads) waiting = i;
  }
  if (waiting == l.threads) return 0;
  const Fiber& w = l.fibers[waiting];
  const uint3 thread = decode(waiting, blockDim);
  unsigned count = 0;
  for (unsigned i = 0; i < l.threads; ++i) {
    const Fiber& g = l.fibers[i];
    if (g.state == kDone) {
      const uint3 other = decode(i, blockDim);
      report(l, thread,
             "waits at %s at %s:%d, but thread (%u, %u, %u) has exited: every thread of the "
             "block must reach each barrier",
             collective_name(w.op), w.file, w.line, other.x, other.y, other.z);
      return -1;
    }
    if (!same_site(g, w)) {
      const uint3 other = decode(i, blockDim);
      report(l, thread,
             "waits at %s at %s:%d, but thread (%u, %u, %u) waits at %s at %s:%d: every thread "
             "of the block must reach the same barrier",
             collective_name(w.op), w.file, w.line, other.x, other.y, other.z,
             collective_name(g.op), g.file, g.line);
      return -1;
    }
    count += g.value != 0;
  }
  unsigned long long result = 0;
  if (w.op == kSyncThreadsCount) result = count;
  if (w.op == kSyncThreadsAnd) result = count == l.threads;
  if (w.op == kSyncThreadsOr) result = count != 0;
  for (unsigned i = 0; i < l.threads; ++i) {
    l.fibers[i].result = result;
    l.fibers[i].state = kReady;
  }
  return 1;
}

// ---- shared memory poisoning
struct TlsSearch {
  std::uintptr_t probe, begin, end;
};

inline int find_tls_block(dl_phdr_info* info, std::size_t size, void* data) {
  auto* search = static_cast<TlsSearch*>(data);
  if (size < offsetof(dl_phdr_info, dlpi_tls_data) + sizeof info->dlpi_tls_data ||
      info->dlpi_tls_data == nullptr) {
    return 0;
  }
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type != PT_TLS) continue;
    const auto begin = reinterpret_cast<std::uintptr_t>(info->dlpi_tls_data);
    const auto end = begin + info->dlpi_phdr[i].p_memsz;
    if (search->probe >= begin && search->probe < end) {
      search->begin = begin;
      search->end = end;
      return 1;
    }
  }
  return 0;
}

// The byte ranges of this module's thread-local block that are not the shim's own
// thread-locals: the __shared__ variables (and padding), as (offset from &thread_state, size).
// The layout is the same in every thread. Empty when the block cannot be found (the shared
// memory is then not poisoned).
inline std::vector<std::pair<std::ptrdiff_t, std::size_t>> find_shared_memory() {
  std::vector<std::pair<std::ptrdiff_t, std::size_t>> spans;
  const auto origin = reinterpret_cast<std::uintptr_t>(&thread_state);
  TlsSearch search{origin, 0, 0};
  dl_iterate_phdr(&find_tls_block, &search);
  if (search.end == 0) return spans;
  std::pair<std::uintptr_t, std::uintptr_t> own[] = {
      {reinterpret_cast<std::uintptr_t>(&threadIdx), sizeof threadIdx},
      {reinterpret_cast<std::uintptr_t>(&blockIdx), sizeof blockIdx},
      {reinterpret_cast<std::uintptr_t>(&blockDim), sizeof blockDim},
      {reinterpret_cast<std::uintptr_t>(&gridDim), sizeof gridDim},
      {origin, sizeof thread_state},
  };
  std::sort(std::begin(own), std::end(own));
  std::uintptr_t at = search.begin;
  for (const auto& [address, size] : own) {
    if (address > at) spans.emplace_back(at - origin, address - at);
    at = std::max(at, address + size);
  }
  if (search.end > at) spans.emplace_back(at - origin, search.end - at);
  return spans;
}

// Fills the current thread's shared memory with 0xFF bytes.
inline void poison_shared_memory() {
  static const std::vector<std::pair<std::ptrdiff_t, std::size_t>> spans = find_shared_memory();
  char* origin = reinterpret_cast<char*>(&thread_state);
  for (const auto& [offset, size] : spans) std::memset(origin + offset, 0xFF, size);
}

// ---- running blocks
inline bool prepare_cooperative(Launch& l, void (*invoke)(const void*), const void* payload) {
  l.invoke = invoke;
  l.payload = payload;
  l.fibers.resize(l.threads);
  l.stacks = acquire_pool(l.threads);
  if (l.stacks == nullptr) {
    report_launch(l, "cannot map %u fiber stacks of %zu bytes", l.threads, kFiberStackBytes);
    return false;
  }
  for (unsigned i = 0; i < l.threads; ++i) l.fibers[i].stack_low = l.stacks->low(i);
  return true;
}

// Runs the current block's threads as fibers to the end; false on a misuse (reported).
inline bool run_cooperative_block(Launch& l) {
  for (unsigned i = 0; i < l.threads; ++i) {
    Fiber& f = l.fibers[i];
    f.state = kReady;
#if defined(CUPYDCN_EMULATION_ASAN)
    // the previous fiber on this stack left the poison of frames that never returned
    __asan_unpoison_memory_region(f.stack_low, kFiberStackBytes);
#endif
    prepare_context(f.context, f.stack_low, kFiberStackBytes, &fiber_entry);
  }
  poison_shared_memory();
  for (;;) {
    if (l.order.shuffled()) l.order.fill(l.thread_order);
    for (unsigned i : l.thread_order) {
      if (l.fibers[i].state != kReady) continue;
      resume(l, i);
      if (l.failed) return false;
    }
    if (complete_warp_groups(l)) continue;
    const int released = release_block_barrier(l);
    if (released <= 0) return released == 0;
  }
}

inline unsigned block_at(Launch& l, unsigned k) {
  if (l.order.shuffled()) return l.block_order[k];
  return (l.order.flags & kReverseOrder) ? l.blocks - 1 - k : k;
}

inline void run_cooperative(Launch& l, const void*) {
  for (unsigned k = 0; k < l.blocks; ++k) {
    blockIdx = decode(block_at(l, k), gridDim);
    if (!run_cooperative_block(l)) return;
  }
}

// Runs grid x block threads as plain calls, in the order of the launch's flags; args[i]
// points at the value of parameter i (the cudaLaunchKernel convention).
template <typename... Args, std::size_t... Is>
void run_sequential_threads(Launch& l, void (*kernel)(Args...), void** args,
                            std::index_sequence<Is...>) {
  const bool flat = l.block.y == 1 && l.block.z == 1;
  for (unsigned k = 0; k < l.blocks; ++k) {
    blockIdx = decode(block_at(l, k), l.grid);
    if (l.order.shuffled()) l.order.fill(l.thread_order);
    for (unsigned t : l.thread_order) {
      threadIdx = flat ? uint3{t, 0, 0} : decode(t, l.block);
      kernel(*static_cast<Args*>(args[Is])...);
    }
  }
}

template <typename... Args>
struct Payload {
  void (*kernel)(Args...);
  void** args;
};

template <typename... Args, std::size_t... Is>
void invoke_kernel(const Payload<Args...>& p, std::index_sequence<Is...>) {
  p.kernel(*static_cast<Args*>(p.args[Is])...);
}
template <typename... Args>
void invoke_payload(const void* payload) {
  invoke_kernel(*static_cast<const Payload<Args...>*>(payload), std::index_sequence_for<Args...>{});
}
template <typename... Args>
void run_sequential(Launch& l, const void* payload) {
  const auto& p = *static_cast<const Payload<Args...>*>(payload);
  run_sequential_threads(l, p.kernel, p.args, std::index_sequence_for<Args...>{});
}

// A fault raised inside a guarded launch jumps back to the launch that installed it.
inline void on_fault(int signal, siginfo_t* info, void*) {
  if (thread_state.fault_target == nullptr) {  // a fault outside a guarded launch: die as usual
    std::signal(signal, SIG_DFL);
    std::raise(signal);
    return;
  }
  thread_state.fault_signal = signal;
  thread_state.fault_address = info->si_addr;
  siglongjmp(*thread_state.fault_target, 1);
}

// Runs body(l, payload) with the fault handlers (kGuardFaults) and the jump target of
// not_cooperative in place; the handlers in place before are restored on return.
inline int run_launch(Launch& l, void (*body)(Launch&, const void*), const void* payload,
                      void** address) {
  const bool guard = (l.order.flags & kGuardFaults) != 0;
  struct sigaction action, old_segv, old_bus;
  stack_t old_signal_stack;
  bool signal_stack_set = false;
  if (guard) {
    std::memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
    if (l.stacks != nullptr) {  // a fiber's stack overflow needs a stack for the handler
      stack_t signal_stack;
      std::memset(&signal_stack, 0, sizeof signal_stack);
      signal_stack.ss_sp = l.stacks->signal_stack();
      signal_stack.ss_size = kSignalStackBytes;
      signal_stack_set = sigaltstack(&signal_stack, &old_signal_stack) == 0;
    }
  }
  sigjmp_buf target;
  int result = 0;
  thread_state.launch = &l;
  const int jumped = sigsetjmp(target, guard ? 1 : 0);
  if (jumped == 0) {
    thread_state.fault_target = &target;
    body(l, payload);
    if (l.failed) result = kMisuse;
  } else if (jumped == 1) {
    result = thread_state.fault_signal;
    *address = thread_state.fault_address;
    if (l.stacks != nullptr && l.stacks->holds(*address)) {  // the guard page below a fiber's stack
      report(l, threadIdx,
             "stack overflow: the thread's frames outgrew its fiber stack of %zu bytes (deep "
             "recursion or large local arrays)",
             kFiberStackBytes);
      result = kMisuse;
    }
  } else {
    result = kMisuse;
  }
  thread_state.fault_target = nullptr;
  thread_state.launch = nullptr;
  if (guard) {
    if (signal_stack_set) sigaltstack(&old_signal_stack, nullptr);
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
  }
  return result;
}

// Sizes the launch and its orders; false (reported) for a grid the emulator cannot run.
inline bool set_up(Launch& l, const unsigned* grid, const unsigned* block) {
  l.grid = dim3(grid[0], grid[1], grid[2]);
  l.block = dim3(block[0], block[1], block[2]);
  gridDim = l.grid;
  blockDim = l.block;
  blockIdx = uint3{0, 0, 0};
  const unsigned long long blocks = 1ull * grid[0] * grid[1] * grid[2];
  const unsigned long long threads = 1ull * block[0] * block[1] * block[2];
  if (blocks == 0 || blocks > 0xFFFFFFFFull || (l.order.shuffled() && blocks > (1ull << 28))) {
    report_launch(l, "a grid of %llu blocks: the emulator runs 1 .. 2^32 - 1 (shuffled: 2^28)",
                  blocks);
    return false;
  }
  if (threads == 0 || threads > 1024) {
    report_launch(l, "a block of %llu threads: CUDA allows 1 .. 1024", threads);
    return false;
  }
  l.blocks = static_cast<unsigned>(blocks);
  l.threads = static_cast<unsigned>(threads);
  if (l.order.shuffled()) {
    l.block_order.resize(l.blocks);
    l.order.fill(l.block_order);
  }
  l.thread_order.resize(l.threads);
  if (!l.order.shuffled()) l.order.fill(l.thread_order);
  return true;
}

// Runs the kernel over the (x, y, z) grid of (x, y, z) blocks `grid` and `block`. Returns 0;
// with kGuardFaults the number of the signal (SIGSEGV, SIGBUS) of a memory fault, its address
// in *address; or kMisuse with a description in message (a NUL-terminated string of at most
// message_size bytes). A launch that faults or fails is abandoned part-way.
template <typename... Args>
int launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block, void** args,
           int flags, void** address, char* message, unsigned message_size) {
  Launch l(flags, message, message_size);
  if (!set_up(l, grid, block)) return kMisuse;
  const Payload<Args...> payload{kernel, args};
  if (flags & kCooperative) {
    if (!prepare_cooperative(l, &invoke_payload<Args...>, &payload)) return kMisuse;
    return run_launch(l, &run_cooperative, &payload, address);
  }
  return run_launch(l, &run_sequential<Args...>, &payload, address);
}

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

}  // namespace cupydcn_emulation

// ---------------------------------------------------------------- block-cooperative built-ins
// Each takes the caller's source position (__builtin_FILE / __builtin_LINE, evaluated at the
// call) for the misuse messages. __shared__: see the top of this file.
#define __shared__ static thread_local
#define CUPYDCN_EMULATION_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(CUPYDCN_EMULATION_SITE) {
  cupydcn_emulation::block_barrier(cupydcn_emulation::kSyncThreads, 0, file, line);
}
inline int __syncthreads_count(int predicate, CUPYDCN_EMULATION_SITE) {
  return static_cast<int>(cupydcn_emulation::block_barrier(cupydcn_emulation::kSyncThreadsCount,
                                                           predicate, file, line));
}
inline int __syncthreads_and(int predicate, CUPYDCN_EMULATION_SITE) {
  return static_cast<int>(
      cupydcn_emulation::block_barrier(cupydcn_emulation::kSyncThreadsAnd, predicate, file, line));
}
inline int __syncthreads_or(int predicate, CUPYDCN_EMULATION_SITE) {
  return static_cast<int>(
      cupydcn_emulation::block_barrier(cupydcn_emulation::kSyncThreadsOr, predicate, file, line));
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, CUPYDCN_EMULATION_SITE) {
  cupydcn_emulation::warp_collective(cupydcn_emulation::kSyncWarp, mask, 0, 0, false, 0, 32, file,
                                     line);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     CUPYDCN_EMULATION_SITE) {
  return cupydcn_emulation::shuffle(cupydcn_emulation::kShflIdx, mask, var, src_lane, width, file,
                                    line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        CUPYDCN_EMULATION_SITE) {
  return cupydcn_emulation::shuffle(cupydcn_emulation::kShflUp, mask, var, static_cast<int>(delta),
                                    width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          CUPYDCN_EMULATION_SITE) {
  return cupydcn_emulation::shuffle(cupydcn_emulation::kShflDown, mask, var,
                                    static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         CUPYDCN_EMULATION_SITE) {
  return cupydcn_emulation::shuffle(cupydcn_emulation::kShflXor, mask, var, lane_mask, width, file,
                                    line);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, CUPYDCN_EMULATION_SITE) {
  return static_cast<unsigned>(cupydcn_emulation::warp_collective(
      cupydcn_emulation::kBallot, mask, predicate != 0, 4, false, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int predicate, CUPYDCN_EMULATION_SITE) {
  return static_cast<int>(cupydcn_emulation::warp_collective(
      cupydcn_emulation::kAny, mask, predicate != 0, 4, false, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int predicate, CUPYDCN_EMULATION_SITE) {
  return static_cast<int>(cupydcn_emulation::warp_collective(
      cupydcn_emulation::kAll, mask, predicate != 0, 4, false, 0, 32, file, line));
}
inline unsigned __activemask(CUPYDCN_EMULATION_SITE) {
  return cupydcn_emulation::active_mask(file, line);
}

template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, CUPYDCN_EMULATION_SITE) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "__match_any_sync takes a 32- or 64-bit integer or float");
  return static_cast<unsigned>(cupydcn_emulation::warp_collective(
      cupydcn_emulation::kMatchAny, mask, cupydcn_emulation::to_bits(value), sizeof(T), false, 0,
      32, file, line));
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* predicate, CUPYDCN_EMULATION_SITE) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "__match_all_sync takes a 32- or 64-bit integer or float");
  const unsigned long long r = cupydcn_emulation::warp_collective(
      cupydcn_emulation::kMatchAll, mask, cupydcn_emulation::to_bits(value), sizeof(T), false, 0,
      32, file, line);
  *predicate = static_cast<int>(r >> 32);
  return static_cast<unsigned>(r);
}

#define CUPYDCN_EMULATION_REDUCE(name, op, type, is_signed)                            \
  inline type name(unsigned mask, type value, CUPYDCN_EMULATION_SITE) {                \
    return static_cast<type>(static_cast<unsigned>(cupydcn_emulation::warp_collective( \
        op, mask, static_cast<unsigned>(value), 4, is_signed, 0, 32, file, line)));    \
  }
CUPYDCN_EMULATION_REDUCE(__reduce_add_sync, cupydcn_emulation::kReduceAdd, unsigned, false)
CUPYDCN_EMULATION_REDUCE(__reduce_add_sync, cupydcn_emulation::kReduceAdd, int, true)
CUPYDCN_EMULATION_REDUCE(__reduce_min_sync, cupydcn_emulation::kReduceMin, unsigned, false)
CUPYDCN_EMULATION_REDUCE(__reduce_min_sync, cupydcn_emulation::kReduceMin, int, true)
CUPYDCN_EMULATION_REDUCE(__reduce_max_sync, cupydcn_emulation::kReduceMax, unsigned, false)
CUPYDCN_EMULATION_REDUCE(__reduce_max_sync, cupydcn_emulation::kReduceMax, int, true)
CUPYDCN_EMULATION_REDUCE(__reduce_and_sync, cupydcn_emulation::kReduceAnd, unsigned, false)
CUPYDCN_EMULATION_REDUCE(__reduce_or_sync, cupydcn_emulation::kReduceOr, unsigned, false)
CUPYDCN_EMULATION_REDUCE(__reduce_xor_sync, cupydcn_emulation::kReduceXor, unsigned, false)
#undef CUPYDCN_EMULATION_REDUCE
#undef CUPYDCN_EMULATION_SITE

// The tensor-core primitives of cupydcn/cuda/kernels/tensor_core.cuh (mma, ldmatrix,
// cp.async) as warp collectives; host_launcher.py's shim_text() inlines this file here.
#include "tensor_core_shim.h"

#pragma GCC visibility pop
