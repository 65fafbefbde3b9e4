// Rotary position embedding, rotate-half convention, on q and k in one launch.
//
// One block per token (blocks stride over tokens); q/k may be strided views (last dim contiguous). Within a token, work items run over
// (head, item): the first `rot_items` items of a head rotate VEC pairs (x[j], x[j + half]) each;
// the remaining items copy the pass-through dims [2 * half, head_dim) when out of place.
// Math in fp32 with fp32 tables; out[j] = x[j] c - x[j+half] s, out[j+half] = x[j+half] c + x[j] s.
#include <algorithm>
#include <climits>

#include "common.cuh"

namespace megaphi {
namespace {

constexpr int kMaxThreads = 512;  // phi-1: 64 heads x 6 items = 384 work items per token, one pass
constexpr int64_t kMaxGrid = MEGAPHI_MAX_GRID_BLOCKS;

struct RotaryLayouts {
    RotaryLayout q_in, q_out, k_in, k_out;
};

__device__ __forceinline__ int64_t offset_of(const RotaryLayout& layout, int64_t b, int64_t s, int64_t h) {
    return b * layout.batch + s * layout.seq + h * layout.head;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rotary_kernel(const T* q_in, T* q_out, const T* k_in, T* k_out, const RotaryLayouts layouts,  // may alias
                  const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                  const int64_t* __restrict__ position_ids, int64_t pos_batch_stride, int64_t offset,
                  int64_t tokens, int64_t seq, int q_heads, int k_heads, int half, int rot_items,
                  int items_per_head, float sin_sign) {
    const int work_per_token = (q_heads + k_heads) * items_per_head;
    for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
        const int64_t b = token / seq;
        const int64_t s = token - b * seq;
        const int64_t pos = position_ids != nullptr ? position_ids[b * pos_batch_stride + s] : offset + s;
        const float* cos_row = cos_table + pos * half;
        const float* sin_row = sin_table + pos * half;
        for (int w = threadIdx.x; w < work_per_token; w += blockDim.x) {
            const int head = w / items_per_head;
            const int item = w - head * items_per_head;
            const bool is_q = head < q_heads;
            const T* src = is_q ? q_in + offset_of(layouts.q_in, b, s, head)
                                : k_in + offset_of(layouts.k_in, b, s, head - q_heads);
            T* dst = is_q ? q_out + offset_of(layouts.q_out, b, s, head)
                          : k_out + offset_of(layouts.k_out, b, s, head - q_heads);
            if (item < rot_items) {
                const int j = item * VEC;
                float x1[VEC], x2[VEC], o1[VEC], o2[VEC];
                load_floats<T, VEC>(src + j, x1);
                load_floats<T, VEC>(src + half + j, x2);
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float c = cos_row[j + i];
                    const float sn = sin_sign * sin_row[j + i];
                    o1[i] = x1[i] * c - x2[i] * sn;
                    o2[i] = x2[i] * c + x1[i] * sn;
                }
                store_floats<T, VEC>(dst + j, o1);
                store_floats<T, VEC>(dst + half + j, o2);
            } else {
                const int j = 2 * half + (item - rot_items) * VEC;
                *reinterpret_cast<Pack<T, VEC>*>(dst + j) = *reinterpret_cast<const Pack<T, VEC>*>(src + j);
            }
        }
    }
}

}  // namespace

static bool layout_allows(const RotaryLayout& layout, int vec) {
    return layout.batch % vec == 0 && layout.seq % vec == 0 && layout.head % vec == 0;
}

void rotary(const void* q_in, void* q_out, const void* k_in, void* k_out, RotaryLayout q_in_layout,
            RotaryLayout q_out_layout, RotaryLayout k_in_layout, RotaryLayout k_out_layout, const float* cos,
            const float* sin, const int64_t* position_ids, int64_t pos_batch_stride, int64_t offset, int64_t batch, int64_t seq,
            int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t half, bool inverse, int dtype, int device,
            void* stream) {
    check_dtype(dtype);
    if (batch < 0 || seq < 0 || q_heads < 1 || k_heads < 0 || half < 1 || 2 * half > head_dim ||
        (q_heads + k_heads) * head_dim > INT_MAX / 2) {
        throw std::invalid_argument("megaphi._cuda rotary: bad sizes");
    }
    if (k_heads > 0 && (k_in == nullptr || k_out == nullptr)) {
        throw std::invalid_argument("megaphi._cuda rotary: k_heads > 0 needs k pointers");
    }
    const bool in_place = q_in == q_out;
    if (k_heads > 0 && (k_in == k_out) != in_place) {
        throw std::invalid_argument("megaphi._cuda rotary: q and k must both be in place or both out of place");
    }
    const int64_t tokens = batch * seq;
    if (tokens == 0) return;
    const DeviceGuard device_guard(device);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const float sin_sign = inverse ? -1.f : 1.f;
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        constexpr int VEC_WIDE = vec16<T>();
        const bool vectorized = half % VEC_WIDE == 0 && head_dim % VEC_WIDE == 0 && aligned16(q_in) &&
                                aligned16(q_out) && aligned16(k_in) && aligned16(k_out) &&
                                layout_allows(q_in_layout, VEC_WIDE) && layout_allows(q_out_layout, VEC_WIDE) &&
                                layout_allows(k_in_layout, VEC_WIDE) && layout_allows(k_out_layout, VEC_WIDE);
        const RotaryLayouts layouts{q_in_layout, q_out_layout, k_in_layout, k_out_layout};
        const int vec = vectorized ? VEC_WIDE : 1;
        const int rot_items = static_cast<int>(half / vec);
        const int copy_items = in_place ? 0 : static_cast<int>((head_dim - 2 * half) / vec);
        const int items_per_head = rot_items + copy_items;
        const int work = static_cast<int>((q_heads + k_heads) * items_per_head);
        const int threads = std::min(kMaxThreads, std::max(32, ((work + 31) / 32) * 32));
        const dim3 grid(static_cast<unsigned>(std::min(tokens, kMaxGrid)));
        const T* qi = static_cast<const T*>(q_in);
        const T* ki = static_cast<const T*>(k_in);
        T* qo = static_cast<T*>(q_out);
        T* ko = static_cast<T*>(k_out);
        const int qh = static_cast<int>(q_heads), kh = static_cast<int>(k_heads);
        const int hf = static_cast<int>(half);
        if (vectorized) {
            MEGAPHI_LAUNCH((rotary_kernel<T, VEC_WIDE>), grid, threads, 0, s, qi, qo, ki, ko, layouts, cos, sin,
                           position_ids, pos_batch_stride, offset, tokens, seq, qh, kh, hf, rot_items, items_per_head,
                           sin_sign);
        } else {
            MEGAPHI_LAUNCH((rotary_kernel<T, 1>), grid, threads, 0, s, qi, qo, ki, ko, layouts, cos, sin, position_ids,
                           pos_batch_stride, offset, tokens, seq, qh, kh, hf, rot_items, items_per_head, sin_sign);
        }
    });
    check_cuda(cudaGetLastError(), "rotary launch");
}

}  // namespace megaphi
