// The int8 route on AVX-VNNI (vpdpbusd, VEX-encoded, 256-bit): Alder Lake and later client cores,
// Sapphire Rapids, Zen 5. Chosen at run time only where the CPU reports avxvnni.
#if defined(__x86_64__)
#include <immintrin.h>

#include "int8.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

namespace pi_int8_avxvnni {
#define I8_ISA 2
#include "int8_impl.h"
#undef I8_ISA
static const Int8Kernels kernels = {"avxvnni", quantize_row, panel, PANEL_ROWS};
}  // namespace pi_int8_avxvnni

#pragma GCC pop_options

const Int8Kernels* int8_kernels_avxvnni() { return &pi_int8_avxvnni::kernels; }
#endif
