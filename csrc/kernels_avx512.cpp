// The AVX-512 (F, BW, DQ, VL) kernel set (Skylake-SP, Ice Lake, Zen 4/5), chosen at run time.
// Compiled for those extensions with a GCC target pragma, in its own namespace (see kernels_avx2.cpp).
#if defined(__x86_64__)
// GCC 12 warns about its own avx512fintrin.h (_mm512_undefined_* in the reduce intrinsics)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "common.h"
#include "int8.h"  // the int8 route's repacked panels, which linear also reads (linear_repacked_t)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")

namespace pi_avx512 {

struct Vec {
    typedef __m512 V;
    static const int W = 16;
    static const int GEMM_MR = 12;
    static const int GEMV_R = 8;  // rows of x per dense GEMV pass (kernels_impl.h)
    static const int DTILE_R = 4;  // rows of x per tile of dequantized weight rows (kernels_impl.h; 0: off)
    static inline V zero() { return _mm512_setzero_ps(); }
    static inline V set1(float a) { return _mm512_set1_ps(a); }
    static inline V load(const float* p) { return _mm512_loadu_ps(p); }
    static inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
    static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
    static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static inline V div(V a, V b) { return _mm512_div_ps(a, b); }
    static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
    static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static inline float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
    static inline float reduce_max(V a) { return _mm512_reduce_max_ps(a); }
    static inline V load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static inline V load_bf16(const uint16_t* p) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    static inline void store_f16(uint16_t* p, V a) {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // round to nearest even, NaN stays a (quiet) NaN: f32_to_bf16 in common.h, 16 lanes at once
    static inline void store_bf16(uint16_t* p, V a) {
        __m512i u = _mm512_castps_si512(a);
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                         _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    // the fp16 scalar at p (a GGUF block's scale), unaligned
    static inline float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
    static inline V load_i8(const int8_t* p) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    }
    // the W low and W high nibbles of p[0..W) as floats, plus offset: a table lookup (vpermps reads
    // only the low 4 bits of each index, so the low nibbles need no mask)
    static inline void nibbles(const uint8_t* p, float offset, V& lo, V& hi) {
        const V table = _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_ps(offset));
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
        lo = _mm512_permutexvar_ps(b, table);
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    }
    // a 16-entry float table indexed by nibbles is one vpermps: Q4 weights are dequantized with it
    static const bool NIBBLE_LUT = true;
    // float((p[i] >> shift) & mask) for i < W (K-quants' high bits: kquant_impl.h)
    static inline V bits(const uint8_t* p, int shift, int mask) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
        b = _mm512_and_si512(_mm512_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask));
        return _mm512_cvtepi32_ps(b);
    }
    static inline V iota(float offset) {  // offset, offset + 1, ..., offset + 15
        return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(offset));
    }
    // the W low and W high nibbles of p[0..W), each replaced by table[nibble]
    static inline void nibbles_lut(const uint8_t* p, V table, V& lo, V& hi) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
        lo = _mm512_permutexvar_ps(b, table);
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    }
    // r[0..15] (16 rows of 16) := its transpose
    static inline void transpose(V* r) {
        V t[16], u[16];
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) {  // u[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
            u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
            u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
            u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
            u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
        }
        for (int k = 0; k < 4; ++k) {
            V x = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), y = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
            V z = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD), w = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
            r[k] = _mm512_shuffle_f32x4(x, y, 0x88);
            r[8 + k] = _mm512_shuffle_f32x4(x, y, 0xDD);
            r[4 + k] = _mm512_shuffle_f32x4(z, w, 0x88);
            r[12 + k] = _mm512_shuffle_f32x4(z, w, 0xDD);
        }
    }
    static inline V min(V a, V b) { return _mm512_min_ps(a, b); }
    static inline V abs(V a) { return _mm512_abs_ps(a); }
    static inline V select_neg(V x, V a, V b) {  // a where x's sign bit is set, else b
        return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(x)), b, a);
    }
    static inline V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static inline V scale_pow2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
    static inline V zero_below(V x, float lo, V y) {  // y where x >= lo, else 0
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_GE_OQ), y);
    }
};

#include "kernels_impl.h"

}  // namespace pi_avx512

#pragma GCC pop_options

const KernelTable* table_avx512() { return &pi_avx512::table; }
#endif
