#include "module.h"

namespace megaphi {
void register_builder(pybind11::module_& m) { (void)m; }
}  // namespace megaphi
