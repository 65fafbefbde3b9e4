// C entry points (for ctypes) of megaphi's kernels built for the CPU with HIP-CPU: the host functions
// of csrc/kernels over raw host pointers. Every call waits for its kernels to finish and returns
// nullptr, or the error message (an exception must not cross into Python through ctypes).
#include <hip/hip_runtime.h>

#include <exception>
#include <string>

#include "common.cuh"
#include "kernels.h"

namespace {

thread_local std::string last_error;

template <typename F>
const char* run_and_wait(F&& launch) {
    try {
        launch();
        megaphi::check_cuda(hipDeviceSynchronize(), "hipDeviceSynchronize");
        return nullptr;
    } catch (const std::exception& error) {
        last_error = error.what();
        return last_error.c_str();
    }
}

megaphi::RotaryLayout layout_of(const int64_t* strides) {
    return megaphi::RotaryLayout{strides[0], strides[1], strides[2]};
}

template <typename T>
void round_floats(const float* src, void* dst, int64_t count) {
    T* out = static_cast<T*>(dst);
    for (int64_t i = 0; i < count; ++i) out[i] = megaphi::from_float<T>(src[i]);
}

template <typename T>
void widen_to_floats(const void* src, float* dst, int64_t count) {
    const T* in = static_cast<const T*>(src);
    for (int64_t i = 0; i < count; ++i) dst[i] = megaphi::to_float(in[i]);
}

}  // namespace

extern "C" {

const char* megaphi_layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                                       float* rstd, int64_t rows, int64_t hidden, float eps, int dtype) {
    return run_and_wait(
        [&] { megaphi::layer_norm_forward(x, weight, bias, y, mean, rstd, rows, hidden, eps, dtype, 0, nullptr); });
}

const char* megaphi_layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                        const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                                        int64_t num_blocks, int64_t rows, int64_t hidden, int dtype) {
    return run_and_wait([&] {
        megaphi::layer_norm_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, workspace, num_blocks, rows,
                                     hidden, dtype, 0, nullptr);
    });
}

// Strides are (batch, seq, head) element strides, three int64 each.
const char* megaphi_rotary(const void* q_in, void* q_out, const void* k_in, void* k_out, const int64_t* q_in_strides,
                           const int64_t* q_out_strides, const int64_t* k_in_strides, const int64_t* k_out_strides,
                           const float* cos, const float* sin, const int64_t* position_ids, int64_t pos_batch_stride,
                           int64_t offset, int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads,
                           int64_t head_dim, int64_t half, int inverse, int dtype) {
    return run_and_wait([&] {
        megaphi::rotary(q_in, q_out, k_in, k_out, layout_of(q_in_strides), layout_of(q_out_strides),
                        layout_of(k_in_strides), layout_of(k_out_strides), cos, sin, position_ids, pos_batch_stride,
                        offset, batch, seq, q_heads, k_heads, head_dim, half, inverse != 0, dtype, 0, nullptr);
    });
}

// The kernels' own dtype conversions (common.cuh's from_float / to_float), so tests can check that
// the CPU stand-ins for __half and __nv_bfloat16 round like the GPU does.
const char* megaphi_round_floats(const float* src, void* dst, int64_t count, int dtype) {
    return run_and_wait([&] {
        megaphi::dispatch_dtype(dtype, [&](auto tag) { round_floats<decltype(tag)>(src, dst, count); });
    });
}

const char* megaphi_widen_to_floats(const void* src, float* dst, int64_t count, int dtype) {
    return run_and_wait([&] {
        megaphi::dispatch_dtype(dtype, [&](auto tag) { widen_to_floats<decltype(tag)>(src, dst, count); });
    });
}

// The fiber runtime's schedule for the launches that follow: order 0 forward, 1 reverse, 2 random
// (tests/hipcpu/fiber_runtime/megaphi_fiber/scheduler.h); seed feeds the random keys, block order and
// shared-memory garbage. HIP-CPU has no schedules to choose.
const char* megaphi_fiber_schedule(int order, uint64_t seed) {
#if defined(MEGAPHI_FIBER_RUNTIME)
    if (order < 0 || order > 2) return "megaphi_fiber_schedule: order must be 0, 1 or 2";
    megaphi_fiber::set_schedule(static_cast<megaphi_fiber::Order>(order), seed);
    return nullptr;
#else
    (void)order;
    (void)seed;
    return "megaphi_fiber_schedule: this build runs on HIP-CPU, not the fiber runtime";
#endif
}

}  // extern "C"
