// megaphi's own minimal HIP runtime for running csrc/kernels on the CPU, used by tests/hipcpu when no
// complete HIP-CPU checkout is at hand, and on purpose: it is built to be harder on the kernels than a
// fixed order of threads. It covers exactly what megaphi's kernels and hip_cpu_compat.h use: dim3 /
// threadIdx / blockIdx / blockDim / gridDim, hipLaunchKernelGGL, static and dynamic shared memory,
// __syncthreads, a warp-scoped barrier for shuffles, __half, and the error/stream calls of the host code.
//
// Execution model (megaphi_fiber/scheduler.h): a block's threads are fibers on the calling OS thread,
// a few blocks at a time interleaved; a fiber runs until it reaches a barrier or returns, and the
// schedule (forward, reverse or seeded random: megaphi_fiber::set_schedule) picks who runs next. A
// barrier releases when every live thread of its scope (the block for __syncthreads, the 32-lane warp
// for shuffles) has arrived; when no fiber can move (a barrier some threads skip) the launch aborts
// with a message. `__shared__` variables are static locals that the scheduler swaps per block and
// fills with fresh garbage for each block, as it does dynamic shared memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

using hipStream_t = void*;
enum hipError_t { hipSuccess = 0, hipErrorInvalidValue = 1, hipErrorInvalidConfiguration = 9,
                  hipErrorLaunchFailure = 719 };

#include "../megaphi_fiber/scheduler.h"

namespace megaphi_fiber {

inline hipError_t last_error = hipSuccess;

template <typename Kernel>
inline const void* address_of(Kernel* kernel) {
    return reinterpret_cast<const void*>(kernel);
}

inline void launch_or_fail(dim3 grid, dim3 block, std::size_t dynamic_bytes, const void* kernel,
                           const std::function<void()>& body) {
    const hipError_t error = launch(grid, block, dynamic_bytes, kernel, body);
    if (error != hipSuccess) last_error = error;
}

}  // namespace megaphi_fiber

#define __syncthreads() megaphi_fiber::sync_block()
#define HIP_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(megaphi_fiber::dynamic_shared_memory())
#define hipLaunchKernelGGL(kernel, grid, block, shared_bytes, stream, ...)                                      \
    megaphi_fiber::launch_or_fail(dim3(grid), dim3(block), shared_bytes, megaphi_fiber::address_of(kernel), \
                                  [&]() { kernel(__VA_ARGS__); })

inline hipError_t hipGetLastError() {
    const hipError_t error = megaphi_fiber::last_error;
    megaphi_fiber::last_error = hipSuccess;
    return error;
}
inline hipError_t hipDeviceSynchronize() { return hipSuccess; }  // launches run to completion
inline hipError_t hipGetDevice(int* device) {
    *device = 0;
    return hipSuccess;
}
inline hipError_t hipSetDevice(int device) { return device == 0 ? hipSuccess : hipErrorLaunchFailure; }
inline const char* hipGetErrorString(hipError_t error) {
    switch (error) {
        case hipSuccess: return "no error";
        case hipErrorInvalidConfiguration: return "invalid launch configuration";
        case hipErrorInvalidValue:
            return "invalid argument (more than 48 KiB of static + dynamic shared memory per block?)";
        default: return "launch failure";
    }
}

// fp16: the compiler's IEEE binary16 (_Float16 converts with round-to-nearest-even).
struct __half {
    _Float16 value;
};
inline float __half2float(__half v) { return static_cast<float>(v.value); }
inline __half __float2half_rn(float v) { return __half{static_cast<_Float16>(v)}; }
