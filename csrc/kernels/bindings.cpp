// pybind11 module megaphi._cuda: the kernels over raw device pointers (Python ints) and the
// caller's CUDA stream handle (torch.cuda.current_stream().cuda_stream), no torch headers.
// megaphi/ops validates tensors before calling these.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

// (batch, seq, head) element strides from Python.
megaphi::RotaryLayout as_layout(const std::array<int64_t, 3>& strides) {
    return megaphi::RotaryLayout{strides[0], strides[1], strides[2]};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "megaphi fused CUDA kernels (LayerNorm, rotary) over raw device pointers";
    m.attr("FLOAT32") = static_cast<int>(megaphi::kFloat32);
    m.attr("FLOAT16") = static_cast<int>(megaphi::kFloat16);
    m.attr("BFLOAT16") = static_cast<int>(megaphi::kBFloat16);

    m.def(
        "layer_norm_forward",
        [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, std::uintptr_t mean,
           std::uintptr_t rstd, int64_t rows, int64_t hidden, float eps, int dtype, int device, std::uintptr_t stream) {
            megaphi::layer_norm_forward(as_ptr<const void>(x), as_ptr<const void>(weight), as_ptr<const void>(bias),
                                        as_ptr<void>(y), as_ptr<float>(mean), as_ptr<float>(rstd), rows, hidden, eps,
                                        dtype, device, as_ptr<void>(stream));
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
        py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "y = LayerNorm(x) over rows x hidden; writes fp32 mean and rstd [rows].");

    m.def(
        "layer_norm_backward",
        [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t mean, std::uintptr_t rstd,
           std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias, std::uintptr_t workspace,
           int64_t num_blocks, int64_t rows, int64_t hidden, int dtype, int device, std::uintptr_t stream) {
            megaphi::layer_norm_backward(as_ptr<const void>(dy), as_ptr<const void>(x), as_ptr<const void>(weight),
                                         as_ptr<const float>(mean), as_ptr<const float>(rstd), as_ptr<void>(dx),
                                         as_ptr<void>(dweight), as_ptr<void>(dbias), as_ptr<float>(workspace),
                                         num_blocks, rows, hidden, dtype, device, as_ptr<void>(stream));
        },
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
        py::arg("dweight"), py::arg("dbias"), py::arg("workspace"), py::arg("num_blocks"), py::arg("rows"),
        py::arg("hidden"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "dx, dweight, dbias; workspace is fp32 [2, num_blocks, hidden].");

    m.def(
        "rotary",
        [](std::uintptr_t q_in, std::uintptr_t q_out, std::uintptr_t k_in, std::uintptr_t k_out,
           const std::array<int64_t, 3>& q_in_strides, const std::array<int64_t, 3>& q_out_strides,
           const std::array<int64_t, 3>& k_in_strides, const std::array<int64_t, 3>& k_out_strides, std::uintptr_t cos,
           std::uintptr_t sin, std::uintptr_t position_ids, int64_t pos_batch_stride, int64_t offset, int64_t batch,
           int64_t seq, int64_t q_heads, int64_t k_heads, int64_t head_dim, int64_t half, bool inverse, int dtype,
           int device, std::uintptr_t stream) {
            megaphi::rotary(as_ptr<const void>(q_in), as_ptr<void>(q_out), as_ptr<const void>(k_in),
                            as_ptr<void>(k_out), as_layout(q_in_strides), as_layout(q_out_strides),
                            as_layout(k_in_strides), as_layout(k_out_strides), as_ptr<const float>(cos),
                            as_ptr<const float>(sin), as_ptr<const int64_t>(position_ids), pos_batch_stride, offset,
                            batch, seq, q_heads, k_heads, head_dim, half, inverse, dtype, device,
                            as_ptr<void>(stream));
        },
        py::arg("q_in"), py::arg("q_out"), py::arg("k_in"), py::arg("k_out"), py::arg("q_in_strides"),
        py::arg("q_out_strides"), py::arg("k_in_strides"), py::arg("k_out_strides"), py::arg("cos"), py::arg("sin"),
        py::arg("position_ids"), py::arg("pos_batch_stride"), py::arg("offset"), py::arg("batch"), py::arg("seq"),
        py::arg("q_heads"), py::arg("k_heads"), py::arg("head_dim"), py::arg("half"), py::arg("inverse"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "Rotate-half rotary on q (and k, when k_heads > 0); strides are (batch, seq, head) in elements;"
        " position_ids = 0 means offset + s.");

    m.def("cuda_runtime_version", &megaphi::cuda_runtime_version, "CUDA runtime version built against");
    m.def("cuda_driver_version", &megaphi::cuda_driver_version, "installed driver's CUDA version, 0 if none");
    m.def("cuda_device_count", &megaphi::cuda_device_count, "devices this module's runtime can use, 0 on error");
    m.def("cuda_device_status", &megaphi::cuda_device_status, "visible devices, or why none");
    m.def("kernel_image_error", &megaphi::kernel_image_error, py::arg("device"),
          "empty if this module has a kernel image the device can run, else the CUDA error");
}
