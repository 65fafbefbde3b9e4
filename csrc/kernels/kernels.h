// Host entry points of megaphi's CUDA kernels. Plain integer/pointer arguments only, so the
// pybind11 bindings need neither torch nor CUDA headers. Every call launches on `stream`
// (a cudaStream_t passed as an opaque pointer) on `device`, asynchronously.
#pragma once

#include <cstdint>
#include <string>

namespace megaphi {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = (x - mean) * rstd * weight + bias over rows of `hidden` elements; mean/rstd are fp32 [rows].
// x, weight, bias, y share `dtype`.
void layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                        float* rstd, int64_t rows, int64_t hidden, float eps, int dtype, int device,
                        void* stream);

// dx, dweight, dbias from dy. `workspace` is fp32 [2, num_blocks, hidden]: per-block partial sums
// of dweight/dbias, reduced over blocks by a second kernel (deterministic, no atomics).
void layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                         const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                         int64_t num_blocks, int64_t rows, int64_t hidden, int dtype, int device,
                         void* stream);

// Element strides of a [batch, seq, heads, head_dim] tensor whose last dim is contiguous.
struct RotaryLayout {
    int64_t batch, seq, head;
};

// Rotate-half rotary on q [batch, seq, q_heads, head_dim] and k [batch, seq, k_heads, head_dim] in
// one launch (k may be null with k_heads = 0); each of q_in, q_out, k_in, k_out has its own strides
// (q and k may be views into a fused qkv tensor). The first 2 * half dims of each head are rotated
// with cos/sin fp32 tables [max_positions, half]; the rest is copied when the output is a
// different buffer. Position of token (b, s): position_ids[b * pos_batch_stride + s] when
// position_ids is given, else offset + s. inverse = true rotates by -angle (the backward).
void rotary(const void* q_in, void* q_out, const void* k_in, void* k_out, RotaryLayout q_in_layout,
            RotaryLayout q_out_layout, RotaryLayout k_in_layout, RotaryLayout k_out_layout, const float* cos,
            const float* sin, const int64_t* position_ids, int64_t pos_batch_stride, int64_t offset,
            int64_t batch, int64_t seq, int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t half,
            bool inverse, int dtype, int device, void* stream);

// CUDA runtime version this module was built against (e.g. 13000), the driver's version (0 when no
// driver is installed), the number of devices this runtime can use (0 on any error, e.g. a driver
// too old for the runtime), and a one-line description of the devices or why there are none.
int cuda_runtime_version();
int cuda_driver_version();
int cuda_device_count();
std::string cuda_device_status();

// Empty when this module has a kernel image (SASS or PTX) the given device can run, else the CUDA
// error saying why not (e.g. cudaErrorNoKernelImageForDevice on a GPU newer/older than the build).
// Restores the caller's current device.
std::string kernel_image_error(int device);

}  // namespace megaphi
