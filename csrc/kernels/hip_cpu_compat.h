// The CUDA names megaphi's kernels use, mapped onto HIP-CPU (ROCm's header-only HIP runtime that runs
// kernels on CPU threads and fibers), so the same .cu sources compile with g++ and run in CPU-only CI.
// Included by common.cuh instead of the CUDA headers when MEGAPHI_HIP_CPU is defined; nvcc never
// sees this file. Build with -DNDEBUG (HIP-CPU's __forceinline__ is empty otherwise, and its header
// helpers then get defined in every translation unit) and link TBB (its parallel algorithms).
#pragma once

#if !defined(NDEBUG)
#error "the HIP-CPU build of megaphi's kernels needs -DNDEBUG"
#endif

#include <hip/hip_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// HIP-CPU marks device functions and kernels `simd` for GCC, which makes it emit a vector clone of
// every helper for each x86 ISA level: several times the compile time for code nothing vectorises.
// Kernels keep `flatten` (helpers inlined into each kernel, as on a GPU).
#undef __device__
#define __device__
#undef __global__
#define __global__ __attribute__((flatten))

using cudaStream_t = hipStream_t;
using cudaError_t = hipError_t;
constexpr cudaError_t cudaSuccess = hipSuccess;

inline cudaError_t cudaGetLastError() { return hipGetLastError(); }
inline const char* cudaGetErrorString(cudaError_t status) { return hipGetErrorString(status); }
inline cudaError_t cudaGetDevice(int* device) { return hipGetDevice(device); }
inline cudaError_t cudaSetDevice(int device) { return hipSetDevice(device); }

namespace megaphi_hip_cpu {

constexpr unsigned kWarpSize = 32;  // a CUDA warp (HIP-CPU's warpSize is 64)
constexpr unsigned kMaxBlockThreads = 1024;

// HIP-CPU runs a block's threads as fibers on one OS thread, and a barrier passes control to the next
// fiber of the block (the last hands back to the first). Its __shfl_xor is such a block-wide barrier,
// which breaks kernels whose warps shuffle different numbers of times (the LayerNorm forward's warps
// own different rows): a warp that finishes first is restarted by the ring and runs on, out of step,
// into the next launch. CUDA synchronises a shuffle within the warp only, so this barrier passes
// control around the caller's warp alone. Uses HIP-CPU internals (Tile::fibers, Fiber::yield, the
// this_tile::has_barrier flag that makes a block run as fibers), as of commit e112c93.
inline void warp_barrier(unsigned lane_id, unsigned block_threads) {
#if defined(MEGAPHI_FIBER_RUNTIME)
    // megaphi's own fiber runtime (tests/hipcpu/fiber_runtime) has warp-scoped barriers built in
    (void)lane_id;
    (void)block_threads;
    megaphi_fiber::sync_warp();
#else
    const unsigned warp_start = lane_id / kWarpSize * kWarpSize;
    const unsigned warp_end = std::min(warp_start + kWarpSize, block_threads);
    if (warp_end - warp_start == 1) return;
    hip::detail::this_tile::has_barrier = true;
    const unsigned next = lane_id + 1 == warp_end ? warp_start : lane_id + 1;
    hip::detail::Fiber::yield(hip::detail::Tile::fibers()[next]);  // fiber i runs thread i of a 1-D block
#endif
}

}  // namespace megaphi_hip_cpu

// All of the caller's warp exchanges values (the mask is always the full warp in megaphi's kernels).
template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
    if (blockDim.y != 1 || blockDim.z != 1) {
        std::fprintf(stderr, "hip_cpu_compat.h: __shfl_xor_sync supports 1-D blocks only\n");
        std::abort();
    }
#if defined(MEGAPHI_FIBER_RUNTIME)
    // blocks interleave there: one slot per thread of the caller's block
    static_assert(sizeof(T) <= megaphi_fiber::kShuffleSlotBytes, "shuffle slot too small");
    T* lanes = static_cast<T*>(megaphi_fiber::shuffle_slots());
#else
    // One slot per thread of the block running on this OS thread (HIP-CPU never interleaves blocks on one).
    thread_local T lanes[megaphi_hip_cpu::kMaxBlockThreads];
#endif
    const unsigned lane_id = threadIdx.x;
    const unsigned partner = lane_id ^ static_cast<unsigned>(lane_mask);
    lanes[lane_id] = value;
    megaphi_hip_cpu::warp_barrier(lane_id, blockDim.x);
    const T result = partner < blockDim.x ? lanes[partner] : value;
    megaphi_hip_cpu::warp_barrier(lane_id, blockDim.x);  // nobody overwrites a slot before all have read
    return result;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

// HIP-CPU has no bfloat16: the upper 16 bits of an IEEE float, converted like cuda_bf16.h does.
struct __nv_bfloat16 {
    std::uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2, "bf16 packs rely on a 2-byte type");

inline float __bfloat162float(__nv_bfloat16 v) {
    const std::uint32_t wide = static_cast<std::uint32_t>(v.bits) << 16;
    float out;
    std::memcpy(&out, &wide, sizeof(out));
    return out;
}

// Round to nearest, ties to even; NaN stays NaN (quiet) instead of rounding into infinity.
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    std::uint32_t wide;
    std::memcpy(&wide, &v, sizeof(wide));
    if (std::isnan(v)) return __nv_bfloat16{static_cast<std::uint16_t>((wide >> 16) | 0x0040u)};
    const std::uint32_t lsb = (wide >> 16) & 1u;
    return __nv_bfloat16{static_cast<std::uint16_t>((wide + 0x7fffu + lsb) >> 16)};
}
