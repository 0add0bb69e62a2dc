// The AVX2 + FMA + F16C kernel set (x86-64 CPUs since Haswell / Zen 1), chosen at run time.
// Only this file is compiled for those extensions (GCC target pragma); all of its code sits in
// its own namespace so no inline function compiled here is shared with the portable path.
#if defined(__x86_64__)
#include <immintrin.h>

#include "common.h"
#include "int8.h"  // the int8 route's repacked panels, which linear also reads (linear_repacked_t)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace pi_avx2 {

struct Vec {
    typedef __m256 V;
    static const int W = 8;
    static const int GEMM_MR = 3;
    static const int GEMV_R = 4;  // rows of x per dense GEMV pass (kernels_impl.h)
    static const int DTILE_R = 2;  // rows of x per tile of dequantized weight rows (kernels_impl.h; 0: off)
    static const bool NIBBLE_LUT = false;  // no 16-entry permute: Q4 goes through int -> float conversions
    static inline V zero() { return _mm256_setzero_ps(); }
    static inline V set1(float a) { return _mm256_set1_ps(a); }
    static inline V load(const float* p) { return _mm256_loadu_ps(p); }
    static inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
    static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
    static inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static inline V div(V a, V b) { return _mm256_div_ps(a, b); }
    static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
    static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static inline float reduce_add(V a) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static inline float reduce_max(V a) {
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static inline V load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static inline V load_bf16(const uint16_t* p) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    static inline void store_f16(uint16_t* p, V a) {
        _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // round to nearest even, NaN stays a (quiet) NaN: f32_to_bf16 in common.h, 8 lanes at once
    static inline void store_bf16(uint16_t* p, V a) {
        __m256i u = _mm256_castps_si256(a);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                         _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
        r = _mm256_srli_epi32(r, 16);  // 0 .. 0xffff: the unsigned-saturating pack keeps it
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
    }
    // the fp16 scalar at p (a GGUF block's scale), unaligned
    static inline float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
    static inline V load_i8(const int8_t* p) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    }
    static inline V iota(float) { return zero(); }  // used only where NIBBLE_LUT
    static inline void nibbles_lut(const uint8_t*, V, V&, V&) {}
    // float((p[i] >> shift) & mask) for i < W (K-quants' high bits: kquant_impl.h)
    static inline V bits(const uint8_t* p, int shift, int mask) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
        b = _mm256_and_si256(_mm256_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
        return _mm256_cvtepi32_ps(b);
    }
    // the W low and W high nibbles of p[0..W) as floats, plus offset
    static inline void nibbles(const uint8_t* p, float offset, V& lo, V& hi) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
        lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
        hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        if (offset != 0.0f) {  // a constant once inlined: Q4_1 (offset 0) skips the adds, which x + 0 needs in IEEE
            lo = _mm256_add_ps(lo, _mm256_set1_ps(offset));
            hi = _mm256_add_ps(hi, _mm256_set1_ps(offset));
        }
    }
    // r[0..7] (8 rows of 8) := its transpose
    static inline void transpose(V* r) {
        V t[8], u[8];
        for (int i = 0; i < 4; ++i) {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) {  // u[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
            u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
            u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
            u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
            u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
        }
        for (int k = 0; k < 4; ++k) {
            r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
            r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
        }
    }
    static inline V min(V a, V b) { return _mm256_min_ps(a, b); }
    static inline V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
    static inline V select_neg(V x, V a, V b) { return _mm256_blendv_ps(b, a, x); }  // a where x's sign bit is set
    static inline V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    // p * 2^n for integral n in [-126, 127]
    static inline V scale_pow2(V p, V n) {
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    }
    // y where x >= lo, else 0
    static inline V zero_below(V x, float lo, V y) {
        return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_LT_OQ), y);
    }
};

#include "kernels_impl.h"

}  // namespace pi_avx2

#pragma GCC pop_options

const KernelTable* table_avx2() { return &pi_avx2::table; }
#endif
