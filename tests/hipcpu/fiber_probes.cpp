// Kernels that show what the fiber runtime (tests/hipcpu/fiber_runtime) does, for its own tests: the
// order threads and blocks run in under each schedule, the garbage in shared memory, each block's own
// copy of it, and the 48 KiB limit. Built into the test library with the fiber runtime only.
#include <hip/hip_runtime.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kProbeStaticBytes = 1024;
constexpr int kSeenBytes = 16;

// Each thread appends block * threads + thread to `log` when it starts, and that plus blocks * threads
// after a __syncthreads().
__global__ void order_kernel(int* log, int* length) {
    const int me = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    log[(*length)++] = me;
    __syncthreads();
    log[(*length)++] = me + static_cast<int>(gridDim.x * blockDim.x);
}

// Thread 0 of each block records the first bytes of static and dynamic shared memory as found, then
// every thread stamps its block's id into both; after a barrier each thread checks the stamps.
__global__ void shared_kernel(unsigned char* seen, int* intact, int dynamic_bytes) {
    __shared__ unsigned char fixed[kProbeStaticBytes];
    HIP_DYNAMIC_SHARED(unsigned char, dynamic);
    const unsigned char stamp = static_cast<unsigned char>(blockIdx.x + 1);
    if (threadIdx.x == 0) {
        std::memcpy(seen + blockIdx.x * 2 * kSeenBytes, fixed, kSeenBytes);
        std::memcpy(seen + blockIdx.x * 2 * kSeenBytes + kSeenBytes, dynamic, kSeenBytes);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kProbeStaticBytes; i += blockDim.x) fixed[i] = stamp;
    for (int i = threadIdx.x; i < dynamic_bytes; i += blockDim.x) dynamic[i] = stamp;
    __syncthreads();
    bool ok = true;
    for (int i = 0; i < kProbeStaticBytes; ++i) ok = ok && fixed[i] == stamp;
    for (int i = 0; i < dynamic_bytes; ++i) ok = ok && dynamic[i] == stamp;
    if (!ok) intact[blockIdx.x] = 0;
}

const char* result(hipError_t error) { return error == hipSuccess ? nullptr : hipGetErrorString(error); }

}  // namespace

extern "C" {

// log must hold 2 * blocks * threads ints.
const char* megaphi_fiber_probe_order(int blocks, int threads, int* log) {
    int length = 0;
    hipLaunchKernelGGL(order_kernel, dim3(blocks), dim3(threads), 0, nullptr, log, &length);
    return result(hipGetLastError());
}

// seen: blocks x 2 x 16 bytes (static, then dynamic shared memory as each block found it);
// intact: blocks ints, set to 1 here, 0 where a block saw another block's stamps.
const char* megaphi_fiber_probe_shared(int blocks, int threads, int dynamic_bytes, unsigned char* seen, int* intact) {
    for (int b = 0; b < blocks; ++b) intact[b] = 1;
    hipLaunchKernelGGL(shared_kernel, dim3(blocks), dim3(threads), static_cast<std::size_t>(dynamic_bytes), nullptr,
                       seen, intact, dynamic_bytes);
    return result(hipGetLastError());
}

}  // extern "C"
