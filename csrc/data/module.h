// Each translation unit of megaphi._C registers its own functions on the module.
#pragma once
#include <pybind11/pybind11.h>

namespace megaphi {
void register_builder(pybind11::module_& m);        // builder.cpp: streaming .bin/.idx writer
void register_index_builders(pybind11::module_& m); // indices.cpp: sample / blending index builders
}  // namespace megaphi
