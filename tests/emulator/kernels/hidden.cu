// A test kernel of the emulator with a barrier the source scan cannot see (pasted from two
// tokens): the file runs without fibers, and the barrier reports that instead of returning as
// if all threads had met (tests/emulator/test_cooperative.py).

namespace emutest {

#define EMUTEST_PASTE(a, b) a##b
__global__ void hidden_barrier(float* output) {
  EMUTEST_PASTE(__sync, threads)();
  output[threadIdx.x] = 1.0f;
}

}  // namespace emutest
