// Host emulation of the tensor-core primitives of cupydcn/cuda/kernels/tensor_core.cuh (mma.sync,
// ldmatrix, cp.async), for the CPU CUDA emulator of cuda_shim.h, which includes this header
// after its block-cooperative built-ins. tensor_core.cuh's cupydcn::tc functions forward to
// the functions of cupydcn_emulation::tc below, with the caller's source position. Every
// layout follows the PTX ISA's tables (groupID g = lane >> 2, threadID_in_group t = lane % 4);
// tensor_core.cuh restates them beside each fragment type.
//
// Warp-level primitives (mma_m16n8k16, mma_m16n8k8_tf32, ldmatrix_*): a collective of the 32
// lanes of the warp, as on the GPU (.sync.aligned; the full warp must exist and arrive). Each
// lane deposits its registers (or its row address) in a slot of its own, then waits at a
// full-mask rendezvous of the emulator's warp collectives (a __syncwarp; its misuse messages
// name the primitive and the caller's line: a lane that exited or waits at a barrier, a
// partial warp). The first lane to resume checks that all 32 deposited for the same call
// (same primitive, same source line, same count of warp-level primitives so far: a lane that
// completed the rendezvous from a __syncwarp of its own is a misuse) and computes every
// lane's result; each lane then reads its own. Slots alternate between two sets per lane (by
// the parity of the lane's count), so a lane racing ahead into the next primitive cannot
// overwrite what a slower lane has still to read: the one after that needs all 32 lanes to
// have read first.
//
// mma: A, B and C are rebuilt from the fragments, and D[i][j] = (((C[i][j] + p_0) + p_1) ...
// + p_{K-1}) with p_k = A[i][k] * B[k][j]: each product is exact in float32 (the operands
// have at most 11 significant bits; bf16 products can still leave float32's range), each sum
// rounded to nearest even in float32, in increasing k. Real tensor cores do not specify their
// internal accumulation (it is not IEEE: products aligned to the largest exponent and summed
// with truncation, in hardware-specific groups), so tests compare with a tolerance. tf32
// operands: the low 13 bits of each register are ignored, as the hardware ignores them in raw
// float32 bits; float_to_tf32 rounds to nearest, ties away from zero (cvt.rna.tf32.f32).
//
// ldmatrix: lane 8j + r of the rendezvous gives the address of row r of matrix j (x1: lanes
// 0-7, x2: 0-15, x4: 0-31; the other lanes' addresses are ignored); it must be 16-byte aligned
// and its 16 bytes inside __shared__ memory. Lane l receives in register j the 32-bit word
// l % 4 of row l / 4 of matrix j; with .trans the elements (row 2 (l % 4), column l / 4) and
// (row 2 (l % 4) + 1, column l / 4), low half first. The rows are read when the rendezvous
// completes, every lane of the warp being there.
//
// cp.async: a copy is NOT performed when issued. Its source bytes are read then (zfill: the
// first src_bytes, the rest zero; src_bytes 0 reads nothing), and the write to shared memory
// is queued in the issuing thread's open group; cp_async_commit closes the group (an empty
// group counts) and cp_async_wait<N> performs the queued copies of every committed group but
// the newest N. A read of the destination before that wait therefore sees the old bytes (the
// block-start poison, 0xFF, if nothing else wrote them): a missing wait, or a missing
// __syncthreads after another thread's wait, is a detectable bug (assert_order_independent).
// Copies never waited for are dropped with the block's shared memory, not reported: on a GPU
// they land after the thread exits, but no thread can synchronise with them any more (a
// __syncthreads with an exited thread is a misuse here), so no race-free kernel can tell.
// Addresses: aligned to the copy size (16 or 4 bytes, the global one too, even with
// src_bytes 0), the destination's bytes inside __shared__ memory, the source outside it.
//
// Misuse (misalignment, an address outside shared memory, src_bytes out of 0 .. 16, lanes of
// a warp at different primitives, a primitive in a launch without fibers) is the launch's
// misuse error (EmulatorFaultError on the Python side), naming the block, thread, primitive
// and source line; a source read past a checked argument's end faults when the copy is
// issued.
//
// State. The slots and the copy queues of the running block live on the heap, one set per
// host thread (a registry keyed by the host thread), reached through a thread-local cache.
// That cache is block-start state on purpose: the launch fills the module's thread-local block
// with 0xFF at every block start (cuda_shim.h), which marks the cache stale, and the next
// primitive resets the state for the new block (discarding the previous block's copies, whose
// shared memory is gone). Where the shim cannot find that block (no poisoning), a change of
// launch, block index or block size resets it instead.
#pragma once

#define CUPYDCN_TENSOR_CORE_SHIM 1

// The standard headers come after cuda_shim.h's CUDA keyword macros, which some of them would
// misread (__noinline__ in GNU attributes): set those aside around the includes.
#pragma push_macro("__noinline__")
#pragma push_macro("__forceinline__")
#pragma push_macro("__shared__")
#undef __noinline__
#undef __forceinline__
#undef __shared__
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>
#pragma pop_macro("__shared__")
#pragma pop_macro("__forceinline__")
#pragma pop_macro("__noinline__")

#pragma GCC visibility push(hidden)

namespace cupydcn_emulation {
namespace tc {

enum Primitive : unsigned char {
  kMmaF16,
  kMmaBf16,
  kMmaTf32,
  kLdmatrixX1,
  kLdmatrixX2,
  kLdmatrixX4,
  kLdmatrixX1Trans,
  kLdmatrixX2Trans,
  kLdmatrixX4Trans,
  kCpAsync16,
  kCpAsync16Zfill,
  kCpAsync4,
  kCpAsyncCommit,
  kCpAsyncWait,
};

inline const char* primitive_name(int p) {
  static const char* const names[] = {
      "cupydcn::tc::mma_m16n8k16<__half>", "cupydcn::tc::mma_m16n8k16<__nv_bfloat16>",
      "cupydcn::tc::mma_m16n8k8_tf32",     "cupydcn::tc::ldmatrix_x1",
      "cupydcn::tc::ldmatrix_x2",          "cupydcn::tc::ldmatrix_x4",
      "cupydcn::tc::ldmatrix_x1_trans",    "cupydcn::tc::ldmatrix_x2_trans",
      "cupydcn::tc::ldmatrix_x4_trans",    "cupydcn::tc::cp_async_16",
      "cupydcn::tc::cp_async_16_zfill",    "cupydcn::tc::cp_async_4",
      "cupydcn::tc::cp_async_commit",      "cupydcn::tc::cp_async_wait",
  };
  return names[p];
}

// ---- pure arithmetic

inline unsigned float_to_tf32(float x) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) {  // Inf stays, NaN stays a (quiet) NaN
    return (u & 0x007FFFFFu) ? ((u | 0x00400000u) & 0xFFFFE000u) : u;
  }
  return (u + 0x1000u) & 0xFFFFE000u;  // half a tf32 ulp on the magnitude: ties away from 0
}

// The value of the 16-bit float in bits 0-15 of `bits`.
inline float half_value(std::uint32_t bits, bool bf16) {
  const auto b = static_cast<unsigned short>(bits & 0xFFFFu);
  if (bf16) {
    __nv_bfloat16 v;
    v.__x = b;
    return __bfloat162float(v);
  }
  __half v;
  v.__x = b;
  return __half2float(v);
}

// ---- per-block state

struct Slot {
  unsigned seq = ~0u;  // the lane's count of warp-level primitives before this one
  unsigned char primitive = 0;
  const char* file = "";
  int line = 0;
  std::uint32_t in[10] = {};           // mma: A (4), B (2), C (4, float bits)
  const unsigned char* row = nullptr;  // ldmatrix
  std::uint32_t out[4] = {};
};

struct Copy {
  unsigned char* destination;
  unsigned bytes;
  unsigned char data[16];
};

struct ThreadCopies {
  std::vector<Copy> open;                   // issued since the last commit
  std::deque<std::vector<Copy>> committed;  // oldest first
};

struct BlockState {
  const Launch* launch = nullptr;
  uint3 block{0, 0, 0};
  unsigned threads = 0;
  std::vector<Slot> slots;         // 2 per thread (by parity of its count)
  std::vector<unsigned> entered;   // per thread: warp-level primitives entered
  std::vector<unsigned> computed;  // per warp and parity: count + 1 of the last one computed
  std::vector<ThreadCopies> copies;
};

// This host thread's BlockState (created on first use, kept for the thread's later launches).
inline BlockState* registered_state() {
  static std::mutex mutex;
  static std::unordered_map<const void*, std::unique_ptr<BlockState>> states;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<BlockState>& state = states[&thread_state];
  if (!state) state = std::make_unique<BlockState>();
  return state.get();
}

// Block-start state (poisoned to 0xFF with the shared memory): `current` is 1 while `state` is
// this host thread's and reset for the running block.
struct StateCache {
  BlockState* volatile state;
  volatile unsigned char current;
};
static thread_local StateCache state_cache;

inline BlockState& block_state(const Launch& l) {
  if (state_cache.current != 1) state_cache.state = registered_state();
  BlockState& s = *state_cache.state;
  if (state_cache.current != 1 || s.launch != &l || s.threads != l.threads ||
      s.block.x != blockIdx.x || s.block.y != blockIdx.y || s.block.z != blockIdx.z) {
    s.launch = &l;
    s.block = blockIdx;
    s.threads = l.threads;
    s.slots.assign(2 * static_cast<std::size_t>(l.threads), Slot{});
    s.entered.assign(l.threads, 0);
    s.computed.assign(2 * ((l.threads + 31) / 32), 0);
    s.copies.assign(l.threads, ThreadCopies{});
    state_cache.current = 1;
  }
  return s;
}

// ---- shared memory

inline const std::vector<std::pair<std::ptrdiff_t, std::size_t>>& shared_spans() {
  static const std::vector<std::pair<std::ptrdiff_t, std::size_t>> spans = find_shared_memory();
  return spans;
}

// Whether [p, p + n) lies in the module's __shared__ storage; true when that is unknown.
inline bool in_shared_memory(const void* p, std::size_t n) {
  const auto& spans = shared_spans();
  if (spans.empty()) return true;
  const auto origin = reinterpret_cast<std::uintptr_t>(&thread_state);
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  for (const auto& [offset, size] : spans) {
    const std::uintptr_t begin = origin + offset;
    if (a >= begin && a + n >= a && a + n <= begin + size) return true;
  }
  return false;
}
// Whether p points into the module's __shared__ storage; false when that is unknown.
inline bool points_into_shared_memory(const void* p) {
  return !shared_spans().empty() && in_shared_memory(p, 1);
}

// ---- launches and misuse

inline Launch& running_launch(int primitive, const char* file, int line) {
  Launch* l = thread_state.launch;
  if (l == nullptr || l->fibers.empty()) not_cooperative(primitive_name(primitive), file, line);
  return *l;
}

// "cupydcn::tc::<primitive> at <file>", kept for the life of the process: the file name of the
// rendezvous, so the emulator's messages about a stuck one name the primitive.
inline const char* site_name(int primitive, const char* file) {
  static std::mutex mutex;
  static std::map<std::pair<int, const char*>, std::string> names;
  std::lock_guard<std::mutex> lock(mutex);
  auto [it, inserted] = names.try_emplace({primitive, file});
  if (inserted) it->second = std::string(primitive_name(primitive)) + " at " + file;
  return it->second.c_str();
}

#define CUPYDCN_TC_FAIL(l, primitive, file, line, format, ...)                                 \
  fail_in_fiber(l, (l).fibers[(l).current], "%s at %s:%d: " format, primitive_name(primitive), \
                file, line, __VA_ARGS__)

// ---- the rendezvous of a warp

// The calling lane's slot for its next warp-level primitive, filled in with the call.
inline Slot& enter(BlockState& s, const Launch& l, int primitive, const char* file, int line) {
  const unsigned i = l.current;
  const unsigned seq = s.entered[i]++;
  Slot& mine = s.slots[2 * static_cast<std::size_t>(i) + (seq & 1u)];
  mine.seq = seq;
  mine.primitive = static_cast<unsigned char>(primitive);
  mine.file = file;
  mine.line = line;
  return mine;
}

// Waits until the 32 lanes of the caller's warp have deposited (their slots filled by enter);
// the first lane to resume checks that they all came to the same call and runs
// compute(lanes), which fills every lane's out from their in.
template <typename Compute>
void meet(Launch& l, BlockState& s, Slot& mine, Compute compute) {
  const unsigned i = l.current;
  warp_collective(kSyncWarp, 0xFFFFFFFFu, 0, 0, false, 0, 32, site_name(mine.primitive, mine.file),
                  mine.line);
  const unsigned base = i - i % warpSize;
  const unsigned parity = mine.seq & 1u;
  unsigned& computed = s.computed[2 * (i / warpSize) + parity];
  if (computed == mine.seq + 1) return;
  Slot* lanes[32];
  for (unsigned lane = 0; lane < 32; ++lane) {
    Slot& other = s.slots[2 * static_cast<std::size_t>(base + lane) + parity];
    const uint3 thread = decode(base + lane, blockDim);
    if (other.seq != mine.seq) {
      CUPYDCN_TC_FAIL(l, mine.primitive, mine.file, mine.line,
                      "lane %u (thread (%u, %u, %u)) completed the warp's rendezvous from a "
                      "__syncwarp of its own, not from this instruction: all 32 lanes of the "
                      "warp must execute the same warp-level matrix instruction",
                      lane, thread.x, thread.y, thread.z);
    }
    if (other.primitive != mine.primitive || other.line != mine.line ||
        (other.file != mine.file && std::strcmp(other.file, mine.file) != 0)) {
      CUPYDCN_TC_FAIL(l, mine.primitive, mine.file, mine.line,
                      "lane %u (thread (%u, %u, %u)) executes %s at %s:%d instead: all 32 lanes "
                      "of the warp must execute the same warp-level matrix instruction",
                      lane, thread.x, thread.y, thread.z, primitive_name(other.primitive),
                      other.file, other.line);
    }
    lanes[lane] = &other;
  }
  compute(lanes);
  computed = mine.seq + 1;
}

// ---- mma

// D = A * B + C of one warp (see the top of this file); primitive kMmaF16, kMmaBf16 (m16n8k16)
// or kMmaTf32 (m16n8k8). d may be c.
inline void mma(int primitive, float* d, const unsigned* a, const unsigned* b, const float* c,
                const char* file, int line) {
  Launch& l = running_launch(primitive, file, line);
  BlockState& s = block_state(l);
  Slot& mine = enter(s, l, primitive, file, line);
  for (int k = 0; k < 4; ++k) mine.in[k] = a[k];
  for (int k = 0; k < 2; ++k) mine.in[4 + k] = b[k];
  for (int k = 0; k < 4; ++k) mine.in[6 + k] = float_bits(c[k]);
  meet(l, s, mine, [primitive](Slot* const* lanes) {
    const bool tf32 = primitive == kMmaTf32;
    const bool bf16 = primitive == kMmaBf16;
    const int depth = tf32 ? 8 : 16;
    float A[16][16], B[16][8], C[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
      const std::uint32_t* in = lanes[lane]->in;
      const unsigned g = lane >> 2, t = lane & 3u;
      if (tf32) {  // one tf32 per register, its low 13 bits ignored
        const auto value = [in](int k) { return bits_float(in[k] & 0xFFFFE000u); };
        A[g][t] = value(0);
        A[g + 8][t] = value(1);
        A[g][t + 4] = value(2);
        A[g + 8][t + 4] = value(3);
        B[t][g] = value(4);
        B[t + 4][g] = value(5);
      } else {  // pairs, the lower index in the low half
        for (unsigned h = 0; h < 2; ++h) {
          const unsigned shift = 16 * h;
          A[g][2 * t + h] = half_value(in[0] >> shift, bf16);
          A[g + 8][2 * t + h] = half_value(in[1] >> shift, bf16);
          A[g][2 * t + 8 + h] = half_value(in[2] >> shift, bf16);
          A[g + 8][2 * t + 8 + h] = half_value(in[3] >> shift, bf16);
          B[2 * t + h][g] = half_value(in[4] >> shift, bf16);
          B[2 * t + 8 + h][g] = half_value(in[5] >> shift, bf16);
        }
      }
      C[g][2 * t] = bits_float(in[6]);
      C[g][2 * t + 1] = bits_float(in[7]);
      C[g + 8][2 * t] = bits_float(in[8]);
      C[g + 8][2 * t + 1] = bits_float(in[9]);
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        float sum = C[i][j];
        for (int k = 0; k < depth; ++k) sum = sum + A[i][k] * B[k][j];
        D[i][j] = sum;
      }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
      std::uint32_t* out = lanes[lane]->out;
      const unsigned g = lane >> 2, t = lane & 3u;
      out[0] = float_bits(D[g][2 * t]);
      out[1] = float_bits(D[g][2 * t + 1]);
      out[2] = float_bits(D[g + 8][2 * t]);
      out[3] = float_bits(D[g + 8][2 * t + 1]);
    }
  });
  for (int k = 0; k < 4; ++k) d[k] = bits_float(mine.out[k]);
}

// ---- ldmatrix

inline void ldmatrix(int count, bool trans, const void* row, unsigned* r, const char* file,
                     int line) {
  const int primitive = (trans ? kLdmatrixX1Trans : kLdmatrixX1) + (count == 1   ? 0
                                                                    : count == 2 ? 1
                                                                                 : 2);
  Launch& l = running_launch(primitive, file, line);
  const unsigned lane = l.current % warpSize;
  if (lane < 8u * static_cast<unsigned>(count)) {  // this lane gives a row address
    if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) {
      CUPYDCN_TC_FAIL(l, primitive, file, line,
                      "the row address %p of lane %u is not 16-byte aligned", row, lane);
    }
    if (!in_shared_memory(row, 16)) {
      CUPYDCN_TC_FAIL(l, primitive, file, line,
                      "the row address %p of lane %u is not in __shared__ memory (ldmatrix reads "
                      "16 bytes of shared memory per row)",
                      row, lane);
    }
  }
  BlockState& s = block_state(l);
  Slot& mine = enter(s, l, primitive, file, line);
  mine.row = static_cast<const unsigned char*>(row);
  meet(l, s, mine, [count, trans](Slot* const* lanes) {
    for (unsigned lane = 0; lane < 32; ++lane) {
      std::uint32_t* out = lanes[lane]->out;
      const unsigned g = lane >> 2, t = lane & 3u;
      for (int j = 0; j < count; ++j) {
        Slot* const* rows = lanes + 8 * j;  // the lanes that give matrix j's rows
        if (!trans) {
          std::memcpy(&out[j], rows[g]->row + 4 * t, 4);
        } else {
          std::uint16_t lo, hi;
          std::memcpy(&lo, rows[2 * t]->row + 2 * g, 2);
          std::memcpy(&hi, rows[2 * t + 1]->row + 2 * g, 2);
          out[j] = static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
        }
      }
    }
  });
  for (int j = 0; j < count; ++j) r[j] = mine.out[j];
}

// ---- cp.async

// One copy of `size` bytes (16 or 4), src_bytes of them read from global (zfill: 0 .. 16).
inline void cp_async(unsigned size, void* shared, const void* global, int src_bytes, bool zfill,
                     const char* file, int line) {
  const int primitive = zfill ? kCpAsync16Zfill : size == 16 ? kCpAsync16 : kCpAsync4;
  Launch& l = running_launch(primitive, file, line);
  if (src_bytes < 0 || src_bytes > static_cast<int>(size)) {
    CUPYDCN_TC_FAIL(l, primitive, file, line, "src_bytes %d is not in 0 .. %u", src_bytes, size);
  }
  if (reinterpret_cast<std::uintptr_t>(shared) % size != 0) {
    CUPYDCN_TC_FAIL(l, primitive, file, line, "the shared address %p is not %u-byte aligned",
                    shared, size);
  }
  if (reinterpret_cast<std::uintptr_t>(global) % size != 0) {
    CUPYDCN_TC_FAIL(l, primitive, file, line, "the global address %p is not %u-byte aligned",
                    global, size);
  }
  if (!in_shared_memory(shared, size)) {
    CUPYDCN_TC_FAIL(l, primitive, file, line,
                    "the shared address %p is not in __shared__ memory (%u bytes from it)", shared,
                    size);
  }
  if (points_into_shared_memory(global)) {
    CUPYDCN_TC_FAIL(l, primitive, file, line,
                    "the global address %p is in __shared__ memory (cp.async copies global "
                    "memory to shared memory)",
                    global);
  }
  BlockState& s = block_state(l);
  Copy copy;
  copy.destination = static_cast<unsigned char*>(shared);
  copy.bytes = size;
  std::memset(copy.data, 0, sizeof copy.data);
  if (src_bytes > 0) std::memcpy(copy.data, global, static_cast<std::size_t>(src_bytes));
  s.copies[l.current].open.push_back(copy);
}

inline void cp_async_commit(const char* file, int line) {
  Launch& l = running_launch(kCpAsyncCommit, file, line);
  ThreadCopies& mine = block_state(l).copies[l.current];
  mine.committed.push_back(std::move(mine.open));
  mine.open.clear();
}

inline void cp_async_wait(int pending, const char* file, int line) {
  Launch& l = running_launch(kCpAsyncWait, file, line);
  ThreadCopies& mine = block_state(l).copies[l.current];
  while (mine.committed.size() > static_cast<std::size_t>(pending)) {
    for (const Copy& copy : mine.committed.front()) {
      std::memcpy(copy.destination, copy.data, copy.bytes);
    }
    mine.committed.pop_front();
  }
}

#undef CUPYDCN_TC_FAIL

}  // namespace tc
}  // namespace cupydcn_emulation

#pragma GCC visibility pop
