// The Python module slimkern._C: importing it runs every TORCH_LIBRARY registration
// in csrc/ (ops and solvers). It also carries the build configuration so
// `python -m slimkern.info` can tell what torch/CUDA the kernels were built against.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef SLIMKERN_BUILD_INFO
#define SLIMKERN_BUILD_INFO "{}"
#endif

namespace slimkern {

std::string build_info() { return SLIMKERN_BUILD_INFO; }

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  m.def("_build_info() -> str", &build_info);
}

}  // namespace slimkern

extern "C" {
// A bare module: everything user-facing goes through torch.ops.slimkern.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
