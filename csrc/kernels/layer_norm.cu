// LayerNorm forward and backward over the last dimension, fp32 statistics and accumulation.
//
// Forward:  fast path (hidden 1024, and 2048 for 16-bit types; 16-byte aligned): one warp per row, the row held in
//           registers, exact two-pass mean/variance. Generic path: one block per row, three sweeps
//           over the row (the re-reads hit L1/L2), 16-byte packs when alignment allows.
// Backward: one block per row, blocks stride over rows; each thread owns a fixed set of columns
//           and accumulates its dweight/dbias partials privately (registers on the fast path,
//           shared or global memory otherwise), then writes them to workspace[2, blocks, hidden].
//           A second kernel sums the partials over blocks in a fixed order: deterministic, no atomics.
#include <algorithm>
#include <climits>

#include "common.cuh"

namespace megaphi {
namespace {

constexpr int kFwdWarpsPerBlock = 4;
constexpr int kBwdFastThreads = 128;
constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGrid = MEGAPHI_MAX_GRID_BLOCKS;  // blocks stride over rows beyond this

template <typename T, int HIDDEN>
__global__ void __launch_bounds__(kFwdWarpsPerBlock * 32)
    ln_fwd_warp_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                       T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                       int64_t rows, float eps) {
    constexpr int VEC = vec16<T>();
    constexpr int PACKS = HIDDEN / (32 * VEC);
    static_assert(PACKS >= 1 && HIDDEN % (32 * VEC) == 0, "fast path needs HIDDEN divisible by 32 packs");
    constexpr float inv_hidden = 1.0f / HIDDEN;
    const int lane = threadIdx.x & 31;
    const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kFwdWarpsPerBlock;
    // The whole warp works on one row, so the shuffles below never diverge.
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarpsPerBlock + (threadIdx.x >> 5); row < rows;
         row += warps_total) {
        const T* xr = x + row * HIDDEN;
        float v[PACKS][VEC];
        float sum = 0.f;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            load_floats<T, VEC>(xr + (p * 32 + lane) * VEC, v[p]);
#pragma unroll
            for (int i = 0; i < VEC; ++i) sum += v[p][i];
        }
        const float mean = warp_sum(sum) * inv_hidden;
        float sq = 0.f;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float d = v[p][i] - mean;
                sq += d * d;
            }
        }
        const float rstd = rsqrtf(warp_sum(sq) * inv_hidden + eps);
        T* yr = y + row * HIDDEN;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int col = (p * 32 + lane) * VEC;
            float w[VEC], b[VEC], out[VEC];
            load_floats<T, VEC>(weight + col, w);
            load_floats<T, VEC>(bias + col, b);
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] = (v[p][i] - mean) * rstd * w[i] + b[i];
            store_floats<T, VEC>(yr + col, out);
        }
        if (lane == 0) {
            mean_out[row] = mean;
            rstd_out[row] = rstd;
        }
    }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    ln_fwd_block_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                        T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                        int64_t rows, int hidden, float inv_hidden, float eps) {
    __shared__ float scratch[kBlockSumScratchFloats];
    const int packs = hidden / VEC;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * hidden;
        float sum = 0.f;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float v[VEC];
            load_floats<T, VEC>(xr + p * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) sum += v[i];
        }
        const float mean = block_sum2(sum, 0.f, scratch).x * inv_hidden;
        float sq = 0.f;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float v[VEC];
            load_floats<T, VEC>(xr + p * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float d = v[i] - mean;
                sq += d * d;
            }
        }
        const float rstd = rsqrtf(block_sum2(sq, 0.f, scratch).x * inv_hidden + eps);
        T* yr = y + row * hidden;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float v[VEC], w[VEC], b[VEC], out[VEC];
            load_floats<T, VEC>(xr + p * VEC, v);
            load_floats<T, VEC>(weight + p * VEC, w);
            load_floats<T, VEC>(bias + p * VEC, b);
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] = (v[i] - mean) * rstd * w[i] + b[i];
            store_floats<T, VEC>(yr + p * VEC, out);
        }
        if (threadIdx.x == 0) {
            mean_out[row] = mean;
            rstd_out[row] = rstd;
        }
    }
}

// dx = rstd * (g*dy - mean(g*dy) - xhat * mean(g*dy*xhat)),  xhat = (x - mean) * rstd.
template <typename T, int HIDDEN>
__global__ void __launch_bounds__(kBwdFastThreads)
    ln_bwd_fast_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                       const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                       float* __restrict__ workspace, int64_t rows) {
    constexpr int VEC = vec16<T>();
    constexpr int PACKS = HIDDEN / (kBwdFastThreads * VEC);
    static_assert(PACKS >= 1 && HIDDEN % (kBwdFastThreads * VEC) == 0, "fast path needs whole packs per thread");
    static_assert(VEC % 4 == 0, "partials are written as float4");
    constexpr float inv_hidden = 1.0f / HIDDEN;
    __shared__ float scratch[kBlockSumScratchFloats];
    float w[PACKS][VEC], acc_w[PACKS][VEC], acc_b[PACKS][VEC];
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
        load_floats<T, VEC>(weight + (p * kBwdFastThreads + threadIdx.x) * VEC, w[p]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc_w[p][i] = acc_b[p][i] = 0.f;
    }
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float mu = mean[row];
        const float rs = rstd[row];
        float xhat[PACKS][VEC], wdy[PACKS][VEC];
        float sum_wdy = 0.f, sum_wdy_xhat = 0.f;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int64_t offset = row * HIDDEN + (p * kBwdFastThreads + threadIdx.x) * VEC;
            float xv[VEC], dv[VEC];
            load_floats<T, VEC>(x + offset, xv);
            load_floats<T, VEC>(dy + offset, dv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                xhat[p][i] = (xv[i] - mu) * rs;
                wdy[p][i] = w[p][i] * dv[i];
                acc_w[p][i] += dv[i] * xhat[p][i];
                acc_b[p][i] += dv[i];
                sum_wdy += wdy[p][i];
                sum_wdy_xhat += wdy[p][i] * xhat[p][i];
            }
        }
        const float2 sums = block_sum2(sum_wdy, sum_wdy_xhat, scratch);
        const float m1 = sums.x * inv_hidden;
        const float m2 = sums.y * inv_hidden;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            float out[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) out[i] = rs * (wdy[p][i] - m1 - xhat[p][i] * m2);
            store_floats<T, VEC>(dx + row * HIDDEN + (p * kBwdFastThreads + threadIdx.x) * VEC, out);
        }
    }
    float* part_w = workspace + static_cast<int64_t>(blockIdx.x) * HIDDEN;
    float* part_b = workspace + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * HIDDEN;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
        const int col = (p * kBwdFastThreads + threadIdx.x) * VEC;
#pragma unroll
        for (int i = 0; i < VEC; i += 4) {
            *reinterpret_cast<float4*>(part_w + col + i) =
                make_float4(acc_w[p][i], acc_w[p][i + 1], acc_w[p][i + 2], acc_w[p][i + 3]);
            *reinterpret_cast<float4*>(part_b + col + i) =
                make_float4(acc_b[p][i], acc_b[p][i + 1], acc_b[p][i + 2], acc_b[p][i + 3]);
        }
    }
}

// Generic backward. Partials accumulate in shared memory when 2 * hidden floats fit, else directly
// in this block's workspace rows; either way each thread only touches its own columns.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    ln_bwd_block_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                        const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                        float* __restrict__ workspace, int64_t rows, int hidden, float inv_hidden,
                        bool partials_in_shared) {
    // The static shared memory here counts against the same 48 KiB as the partials, which fill it exactly
    // at hidden 6112: layer_norm_backward's partials_in_shared must count every static byte added.
    MEGAPHI_DYNAMIC_SHARED(float, shared_partials);
    __shared__ float scratch[kBlockSumScratchFloats];
    const int packs = hidden / VEC;
    float* part_w_out = workspace + static_cast<int64_t>(blockIdx.x) * hidden;
    float* part_b_out = workspace + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * hidden;
    float* acc_w = partials_in_shared ? shared_partials : part_w_out;
    float* acc_b = partials_in_shared ? shared_partials + hidden : part_b_out;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc_w[p * VEC + i] = acc_b[p * VEC + i] = 0.f;
    }
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float mu = mean[row];
        const float rs = rstd[row];
        const T* xr = x + row * hidden;
        const T* dyr = dy + row * hidden;
        float sum_wdy = 0.f, sum_wdy_xhat = 0.f;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float xv[VEC], dv[VEC], w[VEC];
            load_floats<T, VEC>(xr + p * VEC, xv);
            load_floats<T, VEC>(dyr + p * VEC, dv);
            load_floats<T, VEC>(weight + p * VEC, w);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float xhat = (xv[i] - mu) * rs;
                const float wdy = w[i] * dv[i];
                sum_wdy += wdy;
                sum_wdy_xhat += wdy * xhat;
            }
        }
        const float2 sums = block_sum2(sum_wdy, sum_wdy_xhat, scratch);
        const float m1 = sums.x * inv_hidden;
        const float m2 = sums.y * inv_hidden;
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            float xv[VEC], dv[VEC], w[VEC], out[VEC];
            load_floats<T, VEC>(xr + p * VEC, xv);
            load_floats<T, VEC>(dyr + p * VEC, dv);
            load_floats<T, VEC>(weight + p * VEC, w);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float xhat = (xv[i] - mu) * rs;
                const float wdy = w[i] * dv[i];
                out[i] = rs * (wdy - m1 - xhat * m2);
                acc_w[p * VEC + i] += dv[i] * xhat;
                acc_b[p * VEC + i] += dv[i];
            }
            store_floats<T, VEC>(dx + row * hidden + p * VEC, out);
        }
    }
    if (partials_in_shared) {
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                part_w_out[p * VEC + i] = acc_w[p * VEC + i];
                part_b_out[p * VEC + i] = acc_b[p * VEC + i];
            }
        }
    }
}

// Second stage: dweight[c] = sum over blocks of workspace[0, block, c] (likewise dbias), in a fixed
// order. Block = 32 columns x 8 lanes over the partial rows.
template <typename T>
__global__ void __launch_bounds__(256)
    ln_bwd_reduce_kernel(const float* __restrict__ workspace, T* __restrict__ dweight, T* __restrict__ dbias,
                         int num_blocks, int hidden) {
    __shared__ float sums_w[8][33];
    __shared__ float sums_b[8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float acc_w = 0.f, acc_b = 0.f;
    if (col < hidden) {
        for (int r = threadIdx.y; r < num_blocks; r += 8) {
            acc_w += workspace[static_cast<int64_t>(r) * hidden + col];
            acc_b += workspace[(static_cast<int64_t>(num_blocks) + r) * hidden + col];
        }
    }
    sums_w[threadIdx.y][threadIdx.x] = acc_w;
    sums_b[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && col < hidden) {
        float total_w = 0.f, total_b = 0.f;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            total_w += sums_w[r][threadIdx.x];
            total_b += sums_b[r][threadIdx.x];
        }
        dweight[col] = from_float<T>(total_w);
        dbias[col] = from_float<T>(total_b);
    }
}

int threads_for(int packs) {
    const int rounded = ((packs + 31) / 32) * 32;
    return rounded < 32 ? 32 : (rounded > kMaxThreads ? kMaxThreads : rounded);
}

void check_sizes(int64_t rows, int64_t hidden, int dtype) {
    check_dtype(dtype);
    if (rows < 0 || hidden <= 0 || hidden > INT_MAX / 2) {
        throw std::invalid_argument("megaphi._cuda layer_norm: bad sizes rows=" + std::to_string(rows) +
                                    " hidden=" + std::to_string(hidden));
    }
}

}  // namespace

void layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                        int64_t rows, int64_t hidden, float eps, int dtype, int device, void* stream) {
    check_sizes(rows, hidden, dtype);
    if (rows == 0) return;
    const DeviceGuard device_guard(device);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int h = static_cast<int>(hidden);
    const float inv_hidden = static_cast<float>(1.0 / static_cast<double>(hidden));
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int VEC = vec16<T>();
        const T* xt = static_cast<const T*>(x);
        const T* wt = static_cast<const T*>(weight);
        const T* bt = static_cast<const T*>(bias);
        T* yt = static_cast<T*>(y);
        const bool vectorized = hidden % VEC == 0 && aligned16(x) && aligned16(weight) && aligned16(bias) && aligned16(y);
        // fp32 rows of 2048 would need ~230 registers per lane in the warp kernel: generic path.
        const bool warp_path = hidden == 1024 || (hidden == 2048 && sizeof(T) == 2);
        if (vectorized && warp_path) {
            const int64_t blocks = std::min<int64_t>((rows + kFwdWarpsPerBlock - 1) / kFwdWarpsPerBlock, kMaxGrid);
            const dim3 grid(static_cast<unsigned>(blocks)), block(kFwdWarpsPerBlock * 32);
            if (hidden == 1024) {
                MEGAPHI_LAUNCH((ln_fwd_warp_kernel<T, 1024>), grid, block, 0, s, xt, wt, bt, yt, mean, rstd, rows, eps);
            } else if constexpr (sizeof(T) == 2) {
                MEGAPHI_LAUNCH((ln_fwd_warp_kernel<T, 2048>), grid, block, 0, s, xt, wt, bt, yt, mean, rstd, rows, eps);
            }
        } else {
            const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)));
            if (vectorized) {
                MEGAPHI_LAUNCH((ln_fwd_block_kernel<T, VEC>), grid, threads_for(h / VEC), 0, s, xt, wt, bt, yt, mean,
                               rstd, rows, h, inv_hidden, eps);
            } else {
                MEGAPHI_LAUNCH((ln_fwd_block_kernel<T, 1>), grid, threads_for(h), 0, s, xt, wt, bt, yt, mean, rstd,
                               rows, h, inv_hidden, eps);
            }
        }
    });
    check_cuda(cudaGetLastError(), "layer_norm_forward launch");
}

void layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
                         void* dx, void* dweight, void* dbias, float* workspace, int64_t num_blocks, int64_t rows,
                         int64_t hidden, int dtype, int device, void* stream) {
    check_sizes(rows, hidden, dtype);
    if (num_blocks < 1 || num_blocks > kMaxGrid) {
        throw std::invalid_argument("megaphi._cuda layer_norm_backward: num_blocks must be in [1, " +
                                    std::to_string(kMaxGrid) + "], got " + std::to_string(num_blocks));
    }
    const DeviceGuard device_guard(device);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int h = static_cast<int>(hidden);
    const int nb = static_cast<int>(num_blocks);
    const float inv_hidden = static_cast<float>(1.0 / static_cast<double>(hidden));
    // Shared-memory partials only within the default 48 KiB per block (no opt-in needed), counting
    // ln_bwd_block_kernel's static scratch: at hidden 6112 the two fill it exactly.
    const bool partials_in_shared =
        2 * hidden * static_cast<int64_t>(sizeof(float)) + kBlockSumScratchFloats * sizeof(float) <= 48 * 1024;
    const size_t shared_bytes = partials_in_shared ? 2 * static_cast<size_t>(hidden) * sizeof(float) : 0;
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int VEC = vec16<T>();
        const T* dyt = static_cast<const T*>(dy);
        const T* xt = static_cast<const T*>(x);
        const T* wt = static_cast<const T*>(weight);
        T* dxt = static_cast<T*>(dx);
        const bool vectorized = hidden % VEC == 0 && aligned16(dy) && aligned16(x) && aligned16(weight) &&
                                aligned16(dx) && aligned16(workspace);
        if (vectorized && hidden == 1024) {
            MEGAPHI_LAUNCH((ln_bwd_fast_kernel<T, 1024>), nb, kBwdFastThreads, 0, s, dyt, xt, wt, mean, rstd, dxt,
                           workspace, rows);
        } else if (vectorized && hidden == 2048) {
            MEGAPHI_LAUNCH((ln_bwd_fast_kernel<T, 2048>), nb, kBwdFastThreads, 0, s, dyt, xt, wt, mean, rstd, dxt,
                           workspace, rows);
        } else if (vectorized) {
            MEGAPHI_LAUNCH((ln_bwd_block_kernel<T, VEC>), nb, threads_for(h / VEC), shared_bytes, s, dyt, xt, wt, mean,
                           rstd, dxt, workspace, rows, h, inv_hidden, partials_in_shared);
        } else {
            MEGAPHI_LAUNCH((ln_bwd_block_kernel<T, 1>), nb, threads_for(h), shared_bytes, s, dyt, xt, wt, mean, rstd,
                           dxt, workspace, rows, h, inv_hidden, partials_in_shared);
        }
        check_cuda(cudaGetLastError(), "layer_norm_backward launch");
        const dim3 grid((h + 31) / 32), block(32, 8);
        MEGAPHI_LAUNCH((ln_bwd_reduce_kernel<T>), grid, block, 0, s, workspace, static_cast<T*>(dweight),
                       static_cast<T*>(dbias), nb, h);
    });
    check_cuda(cudaGetLastError(), "layer_norm_backward reduce launch");
}

}  // namespace megaphi
