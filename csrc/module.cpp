// The Python module accel._C. Importing it runs the static registrations of every kernel
// (TORCH_LIBRARY_IMPL blocks); the op schemas themselves are defined in accel/ops.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "accel's compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
