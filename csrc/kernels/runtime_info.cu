// Runtime/driver/device queries, so Python can say why the kernels are or are not usable.
#include <string>

#include "common.cuh"

namespace megaphi {

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
