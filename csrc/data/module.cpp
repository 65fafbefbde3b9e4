#include "module.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "megaphi C++ data helpers: .bin/.idx builder and dataset index builders";
    megaphi::register_builder(m);
    megaphi::register_index_builders(m);
}
