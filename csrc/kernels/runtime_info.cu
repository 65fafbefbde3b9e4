// Runtime/driver/device queries, so Python can say why the kernels are or are not usable.
#include <string>

#include "common.cuh"

namespace megaphi {
namespace {

// Never launched: compiled with the same -gencode list as the real kernels, so asking the runtime
// for its attributes tells whether this module has a usable image (SASS or PTX) for a device.
__global__ void image_probe_kernel(int* out) {
    if (out != nullptr) *out = 0;
}

}  // namespace

std::string kernel_image_error(int device) {
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status == cudaSuccess && (device < 0 || device >= count)) {
        return "device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)";
    }
    if (status == cudaSuccess) {
        const DeviceGuard device_guard(device);
        cudaFuncAttributes attributes;
        status = cudaFuncGetAttributes(&attributes, image_probe_kernel);
    }
    if (status != cudaSuccess) {
        cudaGetLastError();  // not sticky: clear it so later calls do not report it
        return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    }
    return std::string();
}

int cuda_runtime_version() {
    int version = 0;
    check_cuda(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
    return version;
}

int cuda_driver_version() {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

int cuda_device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return count;
}

std::string cuda_device_status() {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error so later calls do not report it
        return std::string("no usable CUDA device: ") + cudaGetErrorString(status);
    }
    return std::to_string(count) + " CUDA device(s)";
}

}  // namespace megaphi
