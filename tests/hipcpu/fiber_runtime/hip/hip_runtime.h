// megaphi's own minimal HIP runtime for running csrc/kernels on the CPU, used by tests/hipcpu when no
// complete HIP-CPU checkout is at hand (the copy beside the repository keeps only HIP-CPU's include/,
// which needs its src/ and external/ to compile). It covers exactly what megaphi's kernels and
// hip_cpu_compat.h use: dim3 / threadIdx / blockIdx / blockDim / gridDim, hipLaunchKernelGGL, static and
// dynamic shared memory, __syncthreads, a warp-scoped barrier for shuffles, __half, and the error/stream
// calls of the host code.
//
// Execution model: a launch runs its blocks one after another; a block's threads are fibers
// (ucontext) on the calling OS thread. A fiber runs until it reaches a barrier or returns; the
// scheduler then resumes the next fiber whose barrier has been released. A barrier is released when
// every live thread of its scope (the block for __syncthreads, the 32-lane warp for shuffles) has
// arrived; a round in which no fiber can move is a deadlock (e.g. a barrier some threads skip) and
// aborts with a message. Shared memory (`static` locals under __shared__) is safe because blocks never
// interleave. Deterministic: the same launch always interleaves its threads the same way.
#pragma once

#include <ucontext.h>

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
enum hipError_t { hipSuccess = 0, hipErrorInvalidConfiguration = 9, hipErrorLaunchFailure = 719 };

namespace megaphi_fiber {

constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kWarpSize = 32;
constexpr std::size_t kStackBytes = 64 * 1024;

inline hipError_t last_error = hipSuccess;

struct Fiber {
    ucontext_t context;
    std::vector<unsigned char> stack;
    dim3 index;
    bool done = false;
    int waiting_scope = -1;          // -1: runnable; 0: the block; 1 + w: warp w
    std::uint64_t waiting_generation = 0;
};

struct Scope {
    unsigned live = 0, arrived = 0;
    std::uint64_t generation = 0;
};

struct BlockState {
    std::vector<Fiber> fibers;
    std::vector<Scope> scopes;       // [0] the block, [1 + w] warp w
    ucontext_t scheduler;
    unsigned current = 0;
    const std::function<void()>* body = nullptr;
    std::vector<unsigned char> dynamic_shared;
};

inline BlockState& state() {
    static BlockState block;
    return block;
}

inline void* dynamic_shared_memory() { return state().dynamic_shared.data(); }

inline void release_if_complete(Scope& scope) {
    if (scope.arrived > 0 && scope.arrived >= scope.live) {
        scope.arrived = 0;
        ++scope.generation;
    }
}

// Wait until every live thread of the scope (0: block, 1 + w: warp w) has arrived.
inline void barrier(int scope_index) {
    BlockState& block = state();
    Scope& scope = block.scopes[scope_index];
    Fiber& self = block.fibers[block.current];
    const std::uint64_t generation = scope.generation;
    ++scope.arrived;
    release_if_complete(scope);
    if (scope.generation != generation) return;  // the last to arrive goes on at once
    self.waiting_scope = scope_index;
    self.waiting_generation = generation;
    swapcontext(&self.context, &block.scheduler);
}

inline void sync_block() { barrier(0); }

inline void sync_warp() {
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    barrier(1 + static_cast<int>(linear / kWarpSize));
}

inline void fiber_entry() {
    BlockState& block = state();
    (*block.body)();
    Fiber& self = block.fibers[block.current];
    self.done = true;
    const unsigned linear = block.current;
    for (int s : {0, 1 + static_cast<int>(linear / kWarpSize)}) {  // no longer counted at barriers
        --block.scopes[s].live;
        release_if_complete(block.scopes[s]);
    }
    swapcontext(&self.context, &block.scheduler);
}

inline void run_block(const std::function<void()>& body, unsigned threads) {
    BlockState& block = state();
    block.body = &body;
    block.fibers.resize(threads);
    const unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
    block.scopes.assign(1 + warps, Scope{});
    block.scopes[0].live = threads;
    for (unsigned w = 0; w < warps; ++w) block.scopes[1 + w].live = std::min(kWarpSize, threads - w * kWarpSize);
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& fiber = block.fibers[t];
        fiber.stack.resize(kStackBytes);
        fiber.done = false;
        fiber.waiting_scope = -1;
        fiber.index = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.data();
        fiber.context.uc_stack.ss_size = fiber.stack.size();
        fiber.context.uc_link = nullptr;
        makecontext(&fiber.context, fiber_entry, 0);
    }
    unsigned remaining = threads;
    while (remaining > 0) {
        bool moved = false;
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& fiber = block.fibers[t];
            if (fiber.done) continue;
            if (fiber.waiting_scope >= 0) {
                if (block.scopes[fiber.waiting_scope].generation == fiber.waiting_generation) continue;
                fiber.waiting_scope = -1;
            }
            block.current = t;
            threadIdx = fiber.index;
            swapcontext(&block.scheduler, &fiber.context);
            moved = true;
            if (fiber.done) --remaining;
        }
        if (!moved) {
            std::fprintf(stderr, "megaphi fiber runtime: barrier deadlock in block (%u,%u,%u): some threads wait at "
                                 "a barrier the others never reach\n", blockIdx.x, blockIdx.y, blockIdx.z);
            std::abort();
        }
    }
}

inline void launch(dim3 grid, dim3 block_dim, std::size_t shared_bytes, const std::function<void()>& body) {
    const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
    if (threads == 0 || threads > kMaxBlockThreads || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        last_error = hipErrorInvalidConfiguration;
        return;
    }
    gridDim = grid;
    blockDim = block_dim;
    state().dynamic_shared.assign(std::max<std::size_t>(shared_bytes, 1), 0xA5);  // garbage, as on a GPU
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3(x, y, z);
                run_block(body, threads);
            }
}

}  // namespace megaphi_fiber

#define __syncthreads() megaphi_fiber::sync_block()
#define HIP_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(megaphi_fiber::dynamic_shared_memory())
#define hipLaunchKernelGGL(kernel, grid, block, shared_bytes, stream, ...) \
    megaphi_fiber::launch(dim3(grid), dim3(block), shared_bytes, [&]() { kernel(__VA_ARGS__); })

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
        default: return "launch failure";
    }
}

// fp16: the compiler's IEEE binary16 (_Float16 converts with round-to-nearest-even).
struct __half {
    _Float16 value;
};
inline float __half2float(__half v) { return static_cast<float>(v.value); }
inline __half __float2half_rn(float v) { return __half{static_cast<_Float16>(v)}; }
