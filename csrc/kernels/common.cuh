// Shared device helpers for megaphi's kernels: dtype conversion, 16-byte packs, reductions.
#pragma once

#if defined(MEGAPHI_HIP_CPU)  // the same sources on the CPU, for CI without a GPU (tests/hipcpu)
#include "hip_cpu_compat.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

// kernel<<<grid, block, shared_bytes, stream>>>(args...), spelled so that g++ also compiles it against
// HIP-CPU. Put a templated kernel name in parentheses: MEGAPHI_LAUNCH((k<T, 4>), grid, block, 0, s, ...).
#if defined(MEGAPHI_HIP_CPU)
#define MEGAPHI_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
    hipLaunchKernelGGL(kernel, grid, block, shared_bytes, stream, __VA_ARGS__)
#else
#define MEGAPHI_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
    kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#endif

// `extern __shared__ type name[]`: the launch's dynamic shared memory (g++ cannot parse the CUDA form).
#if defined(MEGAPHI_HIP_CPU)
#define MEGAPHI_DYNAMIC_SHARED(type, name) HIP_DYNAMIC_SHARED(type, name)
#else
#define MEGAPHI_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// Most blocks one launch uses; beyond that, blocks stride over rows/tokens. The HIP-CPU test build
// lowers it (tests/hipcpu/build.py) so that a few hundred rows already take every stride.
#ifndef MEGAPHI_MAX_GRID_BLOCKS
#define MEGAPHI_MAX_GRID_BLOCKS (1 << 20)
#endif

namespace megaphi {

// Throws (and so reaches Python as RuntimeError) when a CUDA call or a launch failed.
inline void check_cuda(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
        throw std::runtime_error(std::string("megaphi._cuda: ") + what + ": " + cudaGetErrorString(status));
    }
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) % 16) == 0; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements loaded or stored as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[N]) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_float(pack.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* dst, const float (&src)[N]) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(src[i]);
    *reinterpret_cast<Pack<T, N>*>(dst) = pack;
}

// Elements per 16-byte access.
template <typename T>
__host__ __device__ constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Floats of shared memory block_sum2 needs: two partial sums for each of up to 32 warps.
constexpr int kBlockSumScratchFloats = 64;

// Sum of two values over the block; every thread gets the result. `scratch` holds kBlockSumScratchFloats.
// Ends with a barrier, so scratch can be reused right after the call.
__device__ __forceinline__ float2 block_sum2(float a, float b, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int num_warps = (blockDim.x + 31) >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
        scratch[warp] = a;
        scratch[32 + warp] = b;
    }
    __syncthreads();
    float2 total = make_float2(0.f, 0.f);
    for (int w = 0; w < num_warps; ++w) {  // same order in every thread: deterministic
        total.x += scratch[w];
        total.y += scratch[32 + w];
    }
    __syncthreads();
    return total;
}

inline void check_dtype(int dtype) {
    if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
        throw std::invalid_argument("megaphi._cuda: unsupported dtype code " + std::to_string(dtype));
    }
}

// Dispatches a functor templated on the element type from a runtime dtype code.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
    switch (dtype) {
        case kFloat32: f(float{}); break;
        case kFloat16: f(__half{}); break;
        case kBFloat16: f(__nv_bfloat16{}); break;
        default: throw std::invalid_argument("megaphi._cuda: unsupported dtype code " + std::to_string(dtype));
    }
}

// Makes the tensors' device current for the launches in its scope and restores the caller's
// device on exit: the current device is per thread and shared with torch (both runtimes use the
// driver's current context), so leaving it changed would move torch's default device under the caller.
class DeviceGuard {
   public:
    explicit DeviceGuard(int device) {
        check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) {
            check_cuda(cudaSetDevice(device), "cudaSetDevice");
            restore_ = true;
        }
    }
    ~DeviceGuard() {
        // A destructor must not throw; a failed restore is left for the next CUDA call to report.
        if (restore_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

   private:
    int previous_ = 0;
    bool restore_ = false;
};

}  // namespace megaphi
