// The Python module slimkern._C: importing it runs every TORCH_LIBRARY registration
// in csrc/ (ops and solvers). It also carries the build configuration so
// `python -m slimkern.info` can tell what torch/CUDA the kernels were built against.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "slimkern/cpu_capability.h"
#include "ops/cpu/sgemm.h"

#ifndef SLIMKERN_BUILD_INFO
#define SLIMKERN_BUILD_INFO "{}"
#endif

namespace slimkern {

std::string build_info() { return SLIMKERN_BUILD_INFO; }

// The CPU kernels' instruction set as JSON: in use, what the processor has, and what
// SLIMKERN_CPU_CAPABILITY asked for ("" when unset).
std::string cpu_capability_info() {
  std::string requested;
  for (char ch : cpu::requested_capability())
    if (std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-') requested += ch;  // JSON-safe
  return std::string("{\"in_use\": \"") + cpu::capability_name(cpu::capability()) + "\", \"hardware\": \"" +
         cpu::capability_name(cpu::hardware_capability()) + "\", \"requested\": \"" + requested + "\"}";
}

// Multiply-adds per second of one thread's register-resident FMA loop (cpu/sgemm.h).
double fma_peak(double seconds) {
  TORCH_CHECK(seconds > 0 && seconds <= 10, "fma_peak: seconds must be in (0, 10], got ", seconds);
  return cpu::simd_fma_peak(seconds);
}

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  m.def("_build_info() -> str", &build_info);
  m.def("_cpu_capability() -> str", &cpu_capability_info);
  m.def("_fma_peak(float seconds) -> float", &fma_peak);
}

}  // namespace slimkern

extern "C" {
// A bare module: everything user-facing goes through torch.ops.slimkern.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
