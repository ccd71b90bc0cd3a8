// The Python module object for the compiled extension `sparsevit._C`.
//
// Every kernel file registers its own operators with TORCH_LIBRARY_FRAGMENT(sparsevit_C, m), so
// they appear as torch.ops.sparsevit_C.<name> once this library is loaded; the module itself only
// needs to exist so that `import sparsevit._C` loads the shared object. Keeping registration in each
// file (instead of one big pybind table) lets CPU and CUDA sources be added or left out of the
// build independently.
#include <Python.h>
#include <torch/library.h>

static std::string build_info() {
  std::string info = "cpu";
#ifdef SPARSEVIT_WITH_CUDA
  info += ",cuda";
#endif
  return info;
}

TORCH_LIBRARY(sparsevit_C, m) {
  // Capability probe: lets Python tell which kernel families were compiled in.
  m.def("build_info", &build_info);
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sparsevit compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
