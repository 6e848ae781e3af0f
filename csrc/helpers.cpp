// megalign dataset-index helpers (pybind11). Filled in by the GPT/blended dataset work.
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_helpers, m) { m.doc() = "megalign dataset index helpers"; }
