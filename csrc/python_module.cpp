// The Python module entry point of captcha_fast._C, apart from the ops: `import captcha_fast._C`
// needs a module init, while the ops register when the library loads (torch.ops.load_library
// from Python or dlopen from C++ work the same, with no Python module involved).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
