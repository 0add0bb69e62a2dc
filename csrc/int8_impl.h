// The integer dot products of the int8 route (int8.h), written once and compiled once per path:
// int8_<path>.cpp sets I8_ISA and a GCC target pragma, opens its own namespace and includes this
// file there. I8_ISA: 0 portable (plain C++), 1 AVX2 (maddubs + madd), 2 AVX-VNNI (vpdpbusd on
// ymm, VEX), 3 AVX512-VNNI (vpdpbusd on zmm, loops of their own). The ymm loops are shared by the
// three x86 paths; only their u8 x s8 dot step differs.
//
// Not a standalone header: no include guard; includes come before the namespace.

// ============================================================================
// activation quantization: q = nearbyint(x * (127 / amax)) (round to nearest even, as cvtps2dq
// does), d = amax / 127, s = d * sum(q); the same fp32 operations on every path, so every path
// quantizes a row to the same bytes

static bool quantize_row(int8_t* q, float* d, float* s, const float* x, int64_t K) {
    const int64_t nb = K / QK;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * QK;
#if I8_ISA == 0
        float amax = 0.f;
        for (int i = 0; i < QK; ++i) {
            float a = std::fabs(xb[i]);
            amax = a > amax ? a : amax;
            if (!(a <= 3.4028234e38f)) return false;  // NaN or Inf
        }
        const float id = amax > 0.f ? 127.0f / amax : 0.f;
        int sum = 0;
        for (int i = 0; i < QK; ++i) {
            int v = (int)std::nearbyint(xb[i] * id);
            q[b * QK + i] = (int8_t)v;
            sum += v;
        }
#else
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        // max of |x|; an unordered compare catches NaN, which max_ps would drop
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m256 nan = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q), _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q)),
                                  _mm256_cmp_ps(m, _mm256_set1_ps(3.4028234e38f), _CMP_GT_OQ));
        if (_mm256_movemask_ps(nan)) return false;
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float id = amax > 0.f ? 127.0f / amax : 0.f;
        const __m256 idv = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
        __m256i tot = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        const int sum = _mm_cvtsi128_si32(t);
        // pack 4 x 8 int32 -> 32 int8 (the packs work per 128-bit lane: fix the order with a permute)
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(q + b * QK), p);
#endif
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)sum;
    }
    return true;
}

// ============================================================================
// the panel kernels: one panel (16 output rows, int8.h) against R rows of x. Per block and row of x
// the integer sums p of the codes against x start at x's offsets where the codes are unsigned
// (int8_panel_offsets: -8 S for Q4_0, -128 S for Q8_0, -32 S_h for Q6_K's halves), then
//   Q4_0, Q8_0: y += p d d_x;  Q4_1: y += p d d_x + m s_x;  Q4_K, Q5_K: y += p (d sc) d_x - (dmin m) s_x;
//   Q6_K: y += p_0 (d sc_0) d_x + p_1 (d sc_1) d_x
// in fp32, the same on every path (the SIMD paths fuse the multiply-adds)

// a record's per-row scale factors: scale (d, or d sc), scale1 (Q6_K's second half), offw (m, or
// -dmin m; zero for Q4_0, Q8_0, Q6_K), for row r; hdr: the super-block's header (Q4_K / Q5_K)
static inline void record_scales(float& scale, float& scale1, float& offw, const uint8_t* rec, const uint8_t* hdr,
                                 int r, int fmt) {
    const uint8_t* sc = rec + int8_quant_bytes(fmt);
    scale1 = offw = 0.f;
    if (int8_has_header(fmt)) {
        scale = int8_half(hdr + 2 * r) * (float)sc[r];
        offw = -(int8_half(hdr + 32 + 2 * r) * (float)sc[16 + r]);
        return;
    }
    scale = int8_half(sc + 2 * r);
    if (fmt == Q4_1) offw = int8_half(sc + 32 + 2 * r);
    if (fmt == Q6_K) {
        const int8_t* s6 = (const int8_t*)(sc + 32);
        scale1 = scale * (float)s6[16 + r];
        scale *= (float)s6[r];
    }
}

#if I8_ISA == 0

static void panel(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                  const uint8_t* p, int fmt) {
    const int64_t nb = K / QK;
    float acc[I8_PANEL_ROWS][I8_ROWS] = {};
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* rec = p + int8_record_offset(fmt, b);
        const uint8_t* hdr = rec - (b % int8_span(fmt)) * int8_record_bytes(fmt) - int8_header_bytes(fmt);
        for (int i = 0; i < I8_ROWS; ++i) {
            int u[QK];
            for (int t = 0; t < QK; ++t) u[t] = int8_code(rec, i, t, fmt);
            float scale, scale1, offw;
            record_scales(scale, scale1, offw, rec, hdr, i, fmt);
            for (int r = 0; r < R; ++r) {
                const int8_t* x = q + r * K + b * QK;
                const int32_t* o = xo + (r * nb + b) * 4;
                const float dx = xd[r * nb + b];
                if (fmt == Q6_K) {
                    int p0 = o[0], p1 = o[1];
                    for (int t = 0; t < 16; ++t) {
                        p0 += u[t] * x[t];
                        p1 += u[t + 16] * x[t + 16];
                    }
                    acc[r][i] += (float)p0 * (scale * dx);
                    acc[r][i] += (float)p1 * (scale1 * dx);
                    continue;
                }
                int p0 = fmt == Q4_0 ? o[2] : fmt == Q8_0 ? o[3] : 0;
                for (int t = 0; t < QK; ++t) p0 += u[t] * x[t];
                acc[r][i] += (float)p0 * (scale * dx);
                if (fmt == Q4_1 || int8_has_header(fmt)) acc[r][i] += offw * xs[r * nb + b];
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < I8_ROWS; ++i) y[r * I8_ROWS + i] = acc[r][i];
}

#else

static inline int32_t ld32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// bytes ahead of the current record that the kernels prefetch (through a panel's region and on into
// the next panel's: a thread's panels are one contiguous stream). One linear from memory at one row
// of x, 2 threads, Qwen2-0.5B's 4864x896 and 896x4864, builds alternated in one process: 4096 over
// 2048 1.05-1.25x (Q4_0, Q8_0, Q4_1); 8192 over 4096 0.93-1.09x
static const int64_t PREFETCH_AHEAD = 4096;

#if I8_ISA == 3
// AVX512-VNNI: a code vector is 64 bytes, all 16 rows; a row of x takes one vpdpbusd a quad (its 4
// bytes broadcast), then one convert, multiply and FMA per block (Q4_1 and the K-quants one more FMA
// for the offset, Q6_K one a half): 512 multiply-adds in ~13 instructions. The codes are decoded
// once per block for the R rows of x: the nibbles a mask and a shift, Q5_K's fifth bits and Q6_K's
// high bits one shift and mask a vector.

// the 8 quad vectors of one record (unsigned codes, t[j]: weights 4j .. 4j+3 of the 16 rows)
template <int FMT>
static inline void codes_512(__m512i* t, const uint8_t* rec) {
    if constexpr (FMT == Q8_0) {
        for (int j = 0; j < 8; ++j) t[j] = _mm512_loadu_si512(rec + 64 * j);
        return;
    }
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(rec + 64 * j);
        t[j] = _mm512_and_si512(v, low);
        t[4 + j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    if constexpr (FMT == Q5_K) {  // bit j of each byte, moved to bit 4
        const __m512i h = _mm512_loadu_si512(rec + 256), bit = _mm512_set1_epi8(0x10);
        t[0] = _mm512_or_si512(t[0], _mm512_and_si512(_mm512_slli_epi32(h, 4), bit));
        t[1] = _mm512_or_si512(t[1], _mm512_and_si512(_mm512_slli_epi32(h, 3), bit));
        t[2] = _mm512_or_si512(t[2], _mm512_and_si512(_mm512_slli_epi32(h, 2), bit));
        t[3] = _mm512_or_si512(t[3], _mm512_and_si512(_mm512_slli_epi32(h, 1), bit));
        t[4] = _mm512_or_si512(t[4], _mm512_and_si512(h, bit));
        t[5] = _mm512_or_si512(t[5], _mm512_and_si512(_mm512_srli_epi32(h, 1), bit));
        t[6] = _mm512_or_si512(t[6], _mm512_and_si512(_mm512_srli_epi32(h, 2), bit));
        t[7] = _mm512_or_si512(t[7], _mm512_and_si512(_mm512_srli_epi32(h, 3), bit));
    }
    if constexpr (FMT == Q6_K) {  // bits 2j, 2j+1 of each byte of vector v, moved to bits 4, 5
        const __m512i two = _mm512_set1_epi8(0x30);
        for (int v = 0; v < 2; ++v) {
            const __m512i h = _mm512_loadu_si512(rec + 256 + 64 * v);
            t[4 * v + 0] = _mm512_or_si512(t[4 * v + 0], _mm512_and_si512(_mm512_slli_epi32(h, 4), two));
            t[4 * v + 1] = _mm512_or_si512(t[4 * v + 1], _mm512_and_si512(_mm512_slli_epi32(h, 2), two));
            t[4 * v + 2] = _mm512_or_si512(t[4 * v + 2], _mm512_and_si512(h, two));
            t[4 * v + 3] = _mm512_or_si512(t[4 * v + 3], _mm512_and_si512(_mm512_srli_epi32(h, 2), two));
        }
    }
}

static inline __m512 half16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 u8x16(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 i8x16(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

template <int FMT, int R>
static void panel_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                    const uint8_t* p) {
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const uint8_t* sb = p + j * (HDR + SPAN * REC);
        __m512 dsb = _mm512_setzero_ps(), nmin = _mm512_setzero_ps();
        if constexpr (KQ) {  // the super-block's header: d, -dmin
            dsb = half16(sb);
            nmin = _mm512_sub_ps(_mm512_setzero_ps(), half16(sb + 32));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb;
            const uint8_t* rec = sb + HDR + bb * REC;
            for (int64_t l = 0; l < REC; l += 64) __builtin_prefetch(rec + PREFETCH_AHEAD + l);
            __m512i t[8];
            codes_512<FMT>(t, rec);
            __m512 scale, scale1 = _mm512_setzero_ps(), offw = _mm512_setzero_ps();
            if constexpr (KQ) {
                scale = _mm512_mul_ps(dsb, u8x16(rec + QB));
                offw = _mm512_mul_ps(nmin, u8x16(rec + QB + 16));
            } else if constexpr (FMT == Q6_K) {
                const __m512 d = half16(rec + QB);
                scale = _mm512_mul_ps(d, i8x16(rec + QB + 32));
                scale1 = _mm512_mul_ps(d, i8x16(rec + QB + 48));
            } else {
                scale = half16(rec + QB);
                if constexpr (FMT == Q4_1) offw = half16(rec + QB + 32);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const int32_t* o = xo + (r * nb + b) * 4;  // int8_panel_offsets
                const __m512 dx = _mm512_set1_ps(xd[r * nb + b]);
                // two chains of four (a vpdpbusd's latency is several cycles)
                __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
                if constexpr (FMT == Q6_K) p0 = _mm512_set1_epi32(o[0]), p1 = _mm512_set1_epi32(o[1]);
                if constexpr (FMT == Q4_0) p0 = _mm512_set1_epi32(o[2]);  // -8 sum(q)
                if constexpr (FMT == Q8_0) p0 = _mm512_set1_epi32(o[3]);  // -128 sum(q)
                for (int k = 0; k < 4; ++k) {
                    p0 = _mm512_dpbusd_epi32(p0, t[k], _mm512_set1_epi32(ld32(xb + 4 * k)));
                    p1 = _mm512_dpbusd_epi32(p1, t[4 + k], _mm512_set1_epi32(ld32(xb + 16 + 4 * k)));
                }
                if constexpr (FMT == Q6_K) {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_mul_ps(scale, dx), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_mul_ps(scale1, dx), acc[r]);
                } else {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), _mm512_mul_ps(scale, dx), acc[r]);
                    if constexpr (FMT == Q4_1 || KQ) acc[r] = _mm512_fmadd_ps(offw, _mm512_set1_ps(xs[r * nb + b]), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + 16 * r, acc[r]);
}

static constexpr int PANEL_ROWS = 8;  // 8 quad vectors, 8 rows' sums and the scales in 32 zmm

#else
// AVX2 / AVX-VNNI: a panel as two halves of 8 rows (the low and high 32 bytes of each code vector),
// each against up to 4 rows of x (16 ymm registers: the 8 quad vectors and 4 rows' sums). AVX-VNNI
// takes a vpdpbusd a quad; AVX2 a vpmaddubsw a quad, the int16 pair sums added across quads while
// they stay below 2^15 (codes < 16: eight, < 32: four, < 64: two) before one vpmaddwd. Q8_0's codes
// (up to 255) would overflow vpmaddubsw: AVX2 takes them signed, |w| against x with w's sign.

template <int FMT>
static inline void codes_256(__m256i* t, const uint8_t* rec) {
    if constexpr (FMT == Q8_0) {
        for (int j = 0; j < 8; ++j) t[j] = _mm256_loadu_si256((const __m256i*)(rec + 64 * j));
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(rec + 64 * j));
        t[j] = _mm256_and_si256(v, low);
        t[4 + j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    if constexpr (FMT == Q5_K) {
        const __m256i h = _mm256_loadu_si256((const __m256i*)(rec + 256)), bit = _mm256_set1_epi8(0x10);
        t[0] = _mm256_or_si256(t[0], _mm256_and_si256(_mm256_slli_epi32(h, 4), bit));
        t[1] = _mm256_or_si256(t[1], _mm256_and_si256(_mm256_slli_epi32(h, 3), bit));
        t[2] = _mm256_or_si256(t[2], _mm256_and_si256(_mm256_slli_epi32(h, 2), bit));
        t[3] = _mm256_or_si256(t[3], _mm256_and_si256(_mm256_slli_epi32(h, 1), bit));
        t[4] = _mm256_or_si256(t[4], _mm256_and_si256(h, bit));
        t[5] = _mm256_or_si256(t[5], _mm256_and_si256(_mm256_srli_epi32(h, 1), bit));
        t[6] = _mm256_or_si256(t[6], _mm256_and_si256(_mm256_srli_epi32(h, 2), bit));
        t[7] = _mm256_or_si256(t[7], _mm256_and_si256(_mm256_srli_epi32(h, 3), bit));
    }
    if constexpr (FMT == Q6_K) {
        const __m256i two = _mm256_set1_epi8(0x30);
        for (int v = 0; v < 2; ++v) {
            const __m256i h = _mm256_loadu_si256((const __m256i*)(rec + 256 + 64 * v));
            t[4 * v + 0] = _mm256_or_si256(t[4 * v + 0], _mm256_and_si256(_mm256_slli_epi32(h, 4), two));
            t[4 * v + 1] = _mm256_or_si256(t[4 * v + 1], _mm256_and_si256(_mm256_slli_epi32(h, 2), two));
            t[4 * v + 2] = _mm256_or_si256(t[4 * v + 2], _mm256_and_si256(h, two));
            t[4 * v + 3] = _mm256_or_si256(t[4 * v + 3], _mm256_and_si256(_mm256_srli_epi32(h, 2), two));
        }
    }
}

// the int32 sums of quads k0 .. k0 + n - 1 of a row of x (x: that row's block) against t, added to p
template <int FMT>
static inline __m256i dot_quads(__m256i p, const __m256i* t, const int8_t* x, int k0, int n) {
#if I8_ISA == 2
    for (int k = k0; k < k0 + n; ++k) p = _mm256_dpbusd_avx_epi32(p, t[k], _mm256_set1_epi32(ld32(x + 4 * k)));
    return p;
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (FMT == Q8_0) {  // t holds w + 128: signed w, |w| <= 128 against x with w's sign
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int k = k0; k < k0 + n; ++k) {
            const __m256i w = _mm256_xor_si256(t[k], flip), xk = _mm256_set1_epi32(ld32(x + 4 * k));
            p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xk, w)), ones));
        }
        return p;
    }
    // int16 pair sums added across quads while they stay below 2^15: codes < 16 eight, < 32 four, < 64 two
    constexpr int SPAN16 = FMT == Q6_K ? 2 : FMT == Q5_K ? 4 : 8;
    for (int k1 = k0; k1 < k0 + n; k1 += SPAN16) {
        __m256i s = _mm256_maddubs_epi16(t[k1], _mm256_set1_epi32(ld32(x + 4 * k1)));
        for (int k = k1 + 1; k < k1 + SPAN16 && k < k0 + n; ++k)
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(t[k], _mm256_set1_epi32(ld32(x + 4 * k))));
        p = _mm256_add_epi32(p, _mm256_madd_epi16(s, ones));
    }
    return p;
#endif
}

static inline __m256 half8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 u8x8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline __m256 i8x8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// y [R][16] columns 8h .. 8h+7 = R <= 4 rows of x against half h of the panel at p
template <int FMT, int R>
static void half_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                   const uint8_t* p, int h) {
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const uint8_t* sb = p + j * (HDR + SPAN * REC);
        __m256 dsb = _mm256_setzero_ps(), nmin = _mm256_setzero_ps();
        if constexpr (KQ) {
            dsb = half8(sb + 16 * h);
            nmin = _mm256_sub_ps(_mm256_setzero_ps(), half8(sb + 32 + 16 * h));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb;
            const uint8_t* rec = sb + HDR + bb * REC;
            if (h == 0)
                for (int64_t l = 0; l < REC; l += 64) __builtin_prefetch(rec + PREFETCH_AHEAD + l);
            __m256i t[8];
            codes_256<FMT>(t, rec + 32 * h);
            __m256 scale, scale1 = _mm256_setzero_ps(), offw = _mm256_setzero_ps();
            if constexpr (KQ) {
                scale = _mm256_mul_ps(dsb, u8x8(rec + QB + 8 * h));
                offw = _mm256_mul_ps(nmin, u8x8(rec + QB + 16 + 8 * h));
            } else if constexpr (FMT == Q6_K) {
                const __m256 d = half8(rec + QB + 16 * h);
                scale = _mm256_mul_ps(d, i8x8(rec + QB + 32 + 8 * h));
                scale1 = _mm256_mul_ps(d, i8x8(rec + QB + 48 + 8 * h));
            } else {
                scale = half8(rec + QB + 16 * h);
                if constexpr (FMT == Q4_1) offw = half8(rec + QB + 32 + 16 * h);
            }
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const int32_t* o = xo + (r * nb + b) * 4;  // int8_panel_offsets
                const __m256 dx = _mm256_set1_ps(xd[r * nb + b]);
                if constexpr (FMT == Q6_K) {
                    const __m256i p0 = dot_quads<FMT>(_mm256_set1_epi32(o[0]), t, xb, 0, 4);
                    const __m256i p1 = dot_quads<FMT>(_mm256_set1_epi32(o[1]), t, xb, 4, 4);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(scale, dx), acc[r]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(scale1, dx), acc[r]);
                } else {
                    __m256i p0 = _mm256_setzero_si256();
                    if constexpr (FMT == Q4_0) p0 = _mm256_set1_epi32(o[2]);  // -8 sum(q)
#if I8_ISA == 2
                    if constexpr (FMT == Q8_0) p0 = _mm256_set1_epi32(o[3]);  // -128 sum(q) (AVX2: signed codes)
#endif
                    p0 = dot_quads<FMT>(p0, t, xb, 0, 8);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(scale, dx), acc[r]);
                    if constexpr (FMT == Q4_1 || KQ) acc[r] = _mm256_fmadd_ps(offw, _mm256_set1_ps(xs[r * nb + b]), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + 16 * r + 8 * h, acc[r]);
}

template <int FMT, int R>
static void panel_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                    const uint8_t* p) {
    half_r<FMT, R>(y, q, xd, xs, xo, K, p, 0);
    half_r<FMT, R>(y, q, xd, xs, xo, K, p, 1);
}

static constexpr int PANEL_ROWS = 4;
#endif

template <int FMT>
static void panel_f(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                    const uint8_t* p) {
    switch (R) {
        case 1: panel_r<FMT, 1>(y, q, xd, xs, xo, K, p); break;
        case 2: panel_r<FMT, 2>(y, q, xd, xs, xo, K, p); break;
        case 3: panel_r<FMT, 3>(y, q, xd, xs, xo, K, p); break;
#if I8_ISA == 3
        case 4: panel_r<FMT, 4>(y, q, xd, xs, xo, K, p); break;
        case 5: panel_r<FMT, 5>(y, q, xd, xs, xo, K, p); break;
        case 6: panel_r<FMT, 6>(y, q, xd, xs, xo, K, p); break;
        case 7: panel_r<FMT, 7>(y, q, xd, xs, xo, K, p); break;
        default: panel_r<FMT, 8>(y, q, xd, xs, xo, K, p); break;
#else
        default: panel_r<FMT, 4>(y, q, xd, xs, xo, K, p); break;
#endif
    }
}

static void panel(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                  const uint8_t* p, int fmt) {
    if (fmt == Q8_0) panel_f<Q8_0>(y, q, xd, xs, xo, R, K, p);
    else if (fmt == Q4_0) panel_f<Q4_0>(y, q, xd, xs, xo, R, K, p);
    else if (fmt == Q4_1) panel_f<Q4_1>(y, q, xd, xs, xo, R, K, p);
    else if (fmt == Q4_K) panel_f<Q4_K>(y, q, xd, xs, xo, R, K, p);
    else if (fmt == Q5_K) panel_f<Q5_K>(y, q, xd, xs, xo, R, K, p);
    else panel_f<Q6_K>(y, q, xd, xs, xo, R, K, p);
}

#endif
