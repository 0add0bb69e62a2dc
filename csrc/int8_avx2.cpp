// The int8 route on AVX2 (vpmaddubsw + vpmaddwd): x86-64 CPUs since Haswell / Zen 1.
#if defined(__x86_64__)
#include <immintrin.h>

#include "int8.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace pi_int8_avx2 {
#define I8_ISA 1
#include "int8_impl.h"
#undef I8_ISA
static const Int8Kernels kernels = {"avx2", quantize_row, panel, PANEL_ROWS};
}  // namespace pi_int8_avx2

#pragma GCC pop_options

const Int8Kernels* int8_kernels_avx2() { return &pi_int8_avx2::kernels; }
#endif
