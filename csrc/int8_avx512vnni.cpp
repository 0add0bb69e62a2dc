// The int8 route on AVX512-VNNI (vpdpbusd): Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4/5.
// 512-bit vectors (one block of all four rows a vector: about half the instructions per row of x,
// which is what a decode step of several sequences pays for); the same layout as every path. Chosen
// at run time only where the CPU reports avx512vnni and avx512vl.
#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "int8.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

namespace pi_int8_avx512vnni {
#define I8_ISA 3
#include "int8_impl.h"
#undef I8_ISA
static const Int8Kernels kernels = {"avx512vnni", quantize_row, panel, PANEL_ROWS};
}  // namespace pi_int8_avx512vnni

#pragma GCC pop_options

const Int8Kernels* int8_kernels_avx512vnni() { return &pi_int8_avx512vnni::kernels; }
#endif
