// The int8 route's portable path (plain C++, int32 dot products): any CPU; the reference the
// SIMD paths are tested against.
#include "int8.h"

namespace pi_int8_portable {
#define I8_ISA 0
#include "int8_impl.h"
#undef I8_ISA
static const Int8Kernels kernels = {"portable", quantize_row, panel, 8};
}  // namespace pi_int8_portable

const Int8Kernels* int8_kernels_portable() { return &pi_int8_portable::kernels; }
