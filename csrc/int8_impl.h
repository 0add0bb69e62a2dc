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
// integer dot products against one repacked group of 4 weight rows

#if I8_ISA == 0

static inline float half_at(const uint8_t* p, int64_t i) { return int8_half(p + 2 * i); }

static void dot_group(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t*, int R,
                      int64_t K, const uint8_t* g, int fmt) {
    const int64_t nb = K / QK, qb = int8_quant_bytes(fmt), rec = int8_record_bytes(fmt);
    if (int8_has_header(fmt)) {  // Q4_K / Q5_K: each block's weights (exact in fp32) . q, scaled by d_x
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < I8_ROWS; ++i) {
                float acc = 0.f, w[QK];
                for (int64_t b = 0; b < nb; ++b) {
                    int8_dequant_block(w, g, b, i, fmt);
                    float dot = 0.f;
                    for (int t = 0; t < QK; ++t) dot += w[t] * (float)q[r * K + b * QK + t];
                    acc += xd[r * nb + b] * dot;
                }
                y[r * I8_ROWS + i] = acc;
            }
        return;
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < I8_ROWS; ++i) {
            float acc = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const int8_t* xq = q + r * K + b * QK;
                const uint8_t* rb = g + b * rec;
                const float dw = half_at(rb + qb, i), dx = xd[r * nb + b];
                int dot = 0;
                if (fmt == Q6_K) {  // two sub-blocks of 16, each with its int8 scale
                    const uint8_t *w = rb + i * 16, *qh = rb + 64 + (i % 2) * 16;
                    const int8_t* sc = (const int8_t*)(rb + qb + 8);
                    int dot1 = 0;
                    for (int j = 0; j < 16; ++j) {
                        dot += ((w[j] & 15) + (((qh[j] >> int8_q6_qh_shift(i, j)) & 3) << 4) - 32) * xq[j];
                        dot1 += ((w[j] >> 4) + (((qh[j] >> int8_q6_qh_shift(i, j + 16)) & 3) << 4) - 32) * xq[j + 16];
                    }
                    acc += dw * dx * ((float)sc[int8_q6_sc_index(i, 0)] * (float)dot +
                                      (float)sc[int8_q6_sc_index(i, 1)] * (float)dot1);
                } else if (fmt == Q8_0) {
                    const int8_t* w = (const int8_t*)(rb + i * 32);
                    for (int j = 0; j < QK; ++j) dot += (int)w[j] * xq[j];
                    acc += dw * dx * (float)dot;
                } else {
                    const uint8_t* w = rb + i * 16;
                    for (int j = 0; j < 16; ++j) dot += (w[j] & 15) * xq[j] + (w[j] >> 4) * xq[j + 16];
                    acc += dw * dx * (float)dot;
                    acc += (fmt == Q4_0 ? -8.0f * dw : half_at(rb + qb + 8, i)) * xs[r * nb + b];
                }
            }
            y[r * I8_ROWS + i] = acc;
        }
}

#else

// sum over 4-byte groups of u8 x s8 products, added to the int32 lanes of acc. On AVX2 the pair
// sums of maddubs saturate at int16: callers keep |u| * |s| * 2 <= 32767 (Q4: 15 * 127 * 2 * 2 for
// two maddubs added before the madd; Q8_0: 128 * 127 * 2)
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if I8_ISA == 1
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#elif I8_ISA == 2
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_dpbusd_epi32(acc, u, s);
#endif
}

// u1 . s1 + u2 . s2 per 4-byte group (Q4: low and high nibbles)
static inline __m256i dot2_u8s8(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
#if I8_ISA == 1
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2)),
                             _mm256_set1_epi16(1));
#else
    return dot_u8s8(dot_u8s8(_mm256_setzero_si256(), u1, s1), u2, s2);
#endif
}

static inline __m128 half4(const uint8_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)p)); }

static inline int64_t ld64(const uint8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
static inline int32_t ld32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// bytes ahead of the current block that the dot products prefetch (through a group's region and on
// into the next group's: a thread's groups are one contiguous stream)
static const int64_t PREFETCH_AHEAD = 2048;

// Q4_0 / Q4_1 / Q4_K / Q5_K: per block, two 32-byte loads hold the nibbles of the 4 rows ([row 0 |
// row 1], [row 2 | row 3]); low nibbles are weights 0..15 of a row, high nibbles 16..31, so they meet
// x's halves broadcast into both 128-bit lanes (two 16-byte broadcast loads, no shuffle). One hadd
// folds a row's two vectors of int32 sums into [w0 w0 w2 w2 | w1 w1 w3 w3], scaled once per block by
// [d0 d0 d2 d2 | d1 d1 d3 d3] d_x; the offset term (-8 d_w s_x, m_w s_x, or -dmin m s_x) goes into one
// 4-lane vector per x row. Q4_K / Q5_K: d_w = d sc from the super-block's header (d, dmin: once per 8
// blocks) and the record's uint8 sc and m; Q5_K's fifth bits come from one 16-byte load broadcast,
// lane 1 shifted right by 1 (int8_q5_qh_bit), a shift and mask per vector. (Measured against two
// accumulators per row and per-block lane permutes of x: 1.13-1.34x in one process, interleaved;
// folding pairs of x rows into one vector was no faster.) maddubs' pair sums stay below int16's limit:
// two added before the madd, 2 * 2 * 31 * 127.

template <int FMT, int R>
static inline void dot_group_q4(float* y, const int8_t* q, const float* xd, const float* xs, int64_t K, const uint8_t* g) {
    const int64_t nb = K / QK;
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i isel = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    __m256 acc[R];
    __m128 accm[R];
    for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_setzero_ps();
        accm[r] = _mm_setzero_ps();
    }
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const uint8_t* sb = g + j * (HDR + SPAN * REC);
        __m256 dsb = _mm256_setzero_ps();
        __m128 nmin = _mm_setzero_ps();
        if constexpr (KQ) {  // the super-block's header: [d0 d0 d2 d2 | d1 d1 d3 d3], -dmin
            dsb = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(half4(sb)), isel);
            nmin = _mm_sub_ps(_mm_setzero_ps(), half4(sb + 8));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb;
            const uint8_t* qs = sb + HDR + bb * REC;
            __builtin_prefetch(qs + PREFETCH_AHEAD);  // records are > 64 bytes: two lines a block
            __builtin_prefetch(qs + PREFETCH_AHEAD + 64);
            const __m256i v0 = _mm256_loadu_si256((const __m256i*)qs), v1 = _mm256_loadu_si256((const __m256i*)(qs + 32));
            __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
            __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
            if constexpr (FMT == Q5_K) {
                const __m256i bit = _mm256_set1_epi8(0x10);
                const __m256i h = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(qs + 64))),
                                                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
                lo0 = _mm256_or_si256(lo0, _mm256_and_si256(_mm256_slli_epi16(h, 4), bit));
                hi0 = _mm256_or_si256(hi0, _mm256_and_si256(_mm256_slli_epi16(h, 2), bit));
                lo1 = _mm256_or_si256(lo1, _mm256_and_si256(h, bit));
                hi1 = _mm256_or_si256(hi1, _mm256_and_si256(_mm256_srli_epi16(h, 2), bit));
            }
            __m256 dsel;
            __m128 off;
            if constexpr (KQ) {  // [sc0..3 m0..3] as fp32
                const __m256 sm = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qs + QB))));
                dsel = _mm256_mul_ps(dsb, _mm256_permutevar8x32_ps(sm, isel));
                off = _mm_mul_ps(nmin, _mm256_extractf128_ps(sm, 1));
            } else {
                const __m128 dw = half4(qs + QB);
                dsel = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dw), isel);
                off = FMT == Q4_0 ? _mm_mul_ps(dw, _mm_set1_ps(-8.0f)) : half4(qs + QB + 8);
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)xb));
                const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(xb + 16)));
                const __m256i p = _mm256_hadd_epi32(dot2_u8s8(lo0, xl, hi0, xh), dot2_u8s8(lo1, xl, hi1, xh));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dsel, _mm256_set1_ps(xd[r * nb + b])), acc[r]);
                accm[r] = _mm_fmadd_ps(off, _mm_set1_ps(xs[r * nb + b]), accm[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        const __m256 h = _mm256_hadd_ps(acc[r], acc[r]);
        const __m128 rows = _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(y + r * I8_ROWS, _mm_add_ps(rows, accm[r]));
    }
}

// Q8_0: per block, four 32-byte loads (one row each); signed x signed through |w| and sign(q, w);
// the four rows' int32 sums are folded into [row 0..3 | row 0..3] by three hadds, then scaled once.
template <int R>
static inline void dot_group_q8(float* y, const int8_t* q, const float* xd, int64_t K, const uint8_t* g) {
    const int64_t nb = K / QK;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qs = g + b * int8_record_bytes(Q8_0);  // a block's record: 4 rows x 32 quant bytes, 4 fp16 d
        __builtin_prefetch(qs + PREFETCH_AHEAD);
        __builtin_prefetch(qs + PREFETCH_AHEAD + 64);
        __builtin_prefetch(qs + PREFETCH_AHEAD + 128);
        __m256i w[4], a[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
            w[i] = _mm256_loadu_si256((const __m256i*)(qs + 32 * i));
            a[i] = _mm256_abs_epi8(w[i]);
        }
        const __m128 dw = half4(qs + int8_quant_bytes(Q8_0));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const __m256i xq = _mm256_loadu_si256((const __m256i*)(q + r * K + b * QK));
            __m256i p[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) p[i] = dot_u8s8(_mm256_setzero_si256(), a[i], _mm256_sign_epi8(xq, w[i]));
            const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            const __m128 sc = _mm_mul_ps(dw, _mm_set1_ps(xd[r * nb + b]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_set_m128(sc, sc), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r)
        _mm_storeu_ps(y + r * I8_ROWS, _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)));
}

// Q6_K: per block, the low 4 bits as Q4's nibbles ([row 0 | row 1], [row 2 | row 3]) and one 32-byte
// load of the high 2 bits (int8_q6_qh_shift: one shift and mask each) give the unsigned 6-bit codes u
// of four vectors: [r0 | r1] and [r2 | r3] for weights 0..15 and for 16..31, met by x's halves
// broadcast. Each of a row's two 16-weight sub-blocks has its own scale, so the sums stay apart:
// three hadds give [r0h0 r2h0 r0h1 r2h1 | r1h0 r3h0 r1h1 r3h1], the order of the record's int8 scales
// (int8_q6_sc_index); the -32 of w = d sc (u - 32) is one subtraction of x's offsets xo (32 sum(q)
// per sub-block, int8_offsets) per block and row of x. maddubs' pair sums stay below int16's
// limit: 2 * 63 * 127.
template <int R>
static inline void dot_group_q6(float* y, const int8_t* q, const float* xd, const int32_t* xo, int64_t K,
                                const uint8_t* g) {
    const int64_t nb = K / QK;
    constexpr int64_t REC = int8_record_bytes(Q6_K), QB = int8_quant_bytes(Q6_K);
    const __m256i low = _mm256_set1_epi8(0x0f), high = _mm256_set1_epi8(0x30);
    const __m256i dsel = _mm256_setr_epi32(0, 2, 0, 2, 1, 3, 1, 3);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qs = g + b * REC;
        __builtin_prefetch(qs + PREFETCH_AHEAD);  // records are > 64 bytes: two lines a block
        __builtin_prefetch(qs + PREFETCH_AHEAD + 64);
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)qs), v1 = _mm256_loadu_si256((const __m256i*)(qs + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i*)(qs + 64));
        const __m256i lo0 = _mm256_or_si256(_mm256_and_si256(v0, low), _mm256_and_si256(_mm256_slli_epi16(h, 4), high));
        const __m256i hi0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
                                            _mm256_and_si256(_mm256_slli_epi16(h, 2), high));
        const __m256i lo1 = _mm256_or_si256(_mm256_and_si256(v1, low), _mm256_and_si256(h, high));
        const __m256i hi1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low),
                                            _mm256_and_si256(_mm256_srli_epi16(h, 2), high));
        const __m256 dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(half4(qs + QB)), dsel);
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qs + QB + 8))));
        const __m256 scale = _mm256_mul_ps(dw, sc);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const int8_t* xb = q + r * K + b * QK;
            const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)xb));
            const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(xb + 16)));
            const __m256i z = _mm256_setzero_si256();
            const __m256i s0 = _mm256_hadd_epi32(dot_u8s8(z, lo0, xl), dot_u8s8(z, lo1, xl));
            const __m256i s1 = _mm256_hadd_epi32(dot_u8s8(z, hi0, xh), dot_u8s8(z, hi1, xh));
            const __m256i p = _mm256_sub_epi32(_mm256_hadd_epi32(s0, s1),
                                               _mm256_loadu_si256((const __m256i*)(xo + (r * nb + b) * 8)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(scale, _mm256_set1_ps(xd[r * nb + b])), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) {  // [r0 r2 . . | r1 r3 . .] summed over the two sub-blocks -> [r0 r1 r2 r3]
        const __m128 a = _mm256_castps256_ps128(acc[r]), c = _mm256_extractf128_ps(acc[r], 1);
        _mm_storeu_ps(y + r * I8_ROWS, _mm_unpacklo_ps(_mm_add_ps(a, _mm_movehl_ps(a, a)), _mm_add_ps(c, _mm_movehl_ps(c, c))));
    }
}

#if I8_ISA == 3
// AVX512-VNNI on 512-bit vectors: one vector per block holds all four rows, one 128-bit lane a row,
// so a row's int32 sums never need folding per block (the ymm loops above spend 3 hadds or a hadd
// and its shuffles on that), and a vpdpbusd does 64 multiply-adds. What a row of x costs per block:
// Q4: two dpbusd, a convert, a multiply and an FMA (the ymm loop: four dpbusd, a hadd, the same
// three); Q8_0: two dpbusd, two lane shuffles and an add, the same three. The weight decoding is
// shared by the R rows of x. At the end each lane's four partial sums are folded once.

// [d0 d0 d0 d0 | d1 .. | d2 .. | d3 ..]: four per-row floats spread over the row lanes
static inline __m512 per_lane(__m128 v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(v));
}

// the sum of each 128-bit lane's four floats: [lane 0, lane 1, lane 2, lane 3]
static inline __m128 lane_sums(__m512 a) {
    a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, 0x4e));
    a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, 0xb1));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), a));
}

// The unsigned codes of one block of a group's four rows, a row per 128-bit lane: lo = [row L:
// weights 0..15], hi = [row L: weights 16..31]. Q4_0 / Q4_1 / Q4_K: the nibbles (low nibble = weight
// t, high = t + 16); Q5_K: a fifth bit from the 16 qh bytes broadcast, each lane shifted right by its
// row's bit (int8_q5_qh_bit: 0 1 4 5 under the low nibbles, 2 3 6 7 under the high ones), moved to
// bit 4; Q6_K: two high bits from the 32 qh bytes broadcast as [qh 0..15 | qh 16..31 | ..], which
// puts each row's bits in its lane (int8_q6_qh_shift: 0 0 4 4 per lane under the low nibbles, 2 2 6 6
// under the high); Q8_0 (two loads, [row 0 | row 1] and [row 2 | row 3], 32 bytes a row): w + 128
// (w xor 0x80), the row halves gathered into lo / hi.
template <int FMT>
static inline void codes_512(__m512i& lo, __m512i& hi, const uint8_t* qs) {
    if constexpr (FMT == Q8_0) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(qs), flip);
        const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(qs + 64), flip);
        lo = _mm512_shuffle_i32x4(w0, w1, 0x88);
        hi = _mm512_shuffle_i32x4(w0, w1, 0xdd);
        return;
    }
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i v = _mm512_loadu_si512(qs);
    lo = _mm512_and_si512(v, low);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    if constexpr (FMT == Q5_K) {
        const __m512i bit = _mm512_set1_epi8(0x10);
        const __m512i h = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(qs + 64)));
        const __m512i slo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 4, 4, 4, 4, 5, 5, 5, 5);
        const __m512i shi = _mm512_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3, 6, 6, 6, 6, 7, 7, 7, 7);
        lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi32(h, slo), 4), bit));
        hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi32(h, shi), 4), bit));
    }
    if constexpr (FMT == Q6_K) {
        const __m512i high = _mm512_set1_epi8(0x30);
        const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(qs + 64)));
        const __m512i slo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
        const __m512i shi = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 6, 6, 6, 6, 6, 6, 6, 6);
        lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi32(h, slo), 4), high));
        hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi32(h, shi), 4), high));
    }
}

// Q4_0 / Q4_1 / Q4_K / Q5_K: the block's 64 nibble bytes are [row 0 | row 1 | row 2 | row 3] in one
// load; low nibbles (weights 0..15) meet x[0..15] broadcast to every lane, high nibbles x[16..31].
// (codes_512).
template <int FMT, int R>
static inline void dot_group_q4_512(float* y, const int8_t* q, const float* xd, const float* xs, int64_t K,
                                    const uint8_t* g) {
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    __m512 acc[R];
    __m128 accm[R];
    for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_setzero_ps();
        accm[r] = _mm_setzero_ps();
    }
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const uint8_t* sb = g + j * (HDR + SPAN * REC);
        __m128 dsb = _mm_setzero_ps(), nmin = _mm_setzero_ps();
        if constexpr (KQ) {  // the super-block's header: d, -dmin of the four rows
            dsb = half4(sb);
            nmin = _mm_sub_ps(_mm_setzero_ps(), half4(sb + 8));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb;
            const uint8_t* qs = sb + HDR + bb * REC;
            __builtin_prefetch(qs + PREFETCH_AHEAD);
            __builtin_prefetch(qs + PREFETCH_AHEAD + 64);
            __m512i lo, hi;
            codes_512<FMT>(lo, hi, qs);
            __m512 dsel;
            __m128 off;
            if constexpr (KQ) {  // [sc0..3 m0..3] as fp32
                const __m256 sm = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qs + QB))));
                dsel = per_lane(_mm_mul_ps(dsb, _mm256_castps256_ps128(sm)));
                off = _mm_mul_ps(nmin, _mm256_extractf128_ps(sm, 1));
            } else {
                const __m128 dw = half4(qs + QB);
                dsel = per_lane(dw);
                off = FMT == Q4_0 ? _mm_mul_ps(dw, _mm_set1_ps(-8.0f)) : half4(qs + QB + 8);
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)xb));
                const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(xb + 16)));
                const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dsel, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
                accm[r] = _mm_fmadd_ps(off, _mm_set1_ps(xs[r * nb + b]), accm[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r) _mm_storeu_ps(y + r * I8_ROWS, _mm_add_ps(lane_sums(acc[r]), accm[r]));
}

// Q8_0: two loads hold [row 0 | row 1] and [row 2 | row 3] (32 bytes a row). vpdpbusd multiplies
// unsigned by signed bytes; x + 128 (x xor 0x80) is the unsigned side, and each sum starts from
// -128 sum(w) (one dpbusd of ones against the weights per block, shared by the rows of x), so the
// int32 sums are exactly w . x. Two lane shuffles and an add bring each row's halves into one lane.
template <int R>
static inline void dot_group_q8_512(float* y, const int8_t* q, const float* xd, int64_t K, const uint8_t* g) {
    const int64_t nb = K / QK;
    const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qs = g + b * int8_record_bytes(Q8_0);
        __builtin_prefetch(qs + PREFETCH_AHEAD);
        __builtin_prefetch(qs + PREFETCH_AHEAD + 64);
        __builtin_prefetch(qs + PREFETCH_AHEAD + 128);
        const __m512i w0 = _mm512_loadu_si512(qs), w1 = _mm512_loadu_si512(qs + 64);
        const __m512i z = _mm512_setzero_si512();
        const __m512i c0 = _mm512_sub_epi32(z, _mm512_slli_epi32(_mm512_dpbusd_epi32(z, ones, w0), 7));
        const __m512i c1 = _mm512_sub_epi32(z, _mm512_slli_epi32(_mm512_dpbusd_epi32(z, ones, w1), 7));
        const __m512 dsel = per_lane(half4(qs + int8_quant_bytes(Q8_0)));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const __m512i xu = _mm512_xor_si512(
                _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(q + r * K + b * QK))), flip);
            const __m512i p0 = _mm512_dpbusd_epi32(c0, xu, w0), p1 = _mm512_dpbusd_epi32(c1, xu, w1);
            const __m512i p = _mm512_add_epi32(_mm512_shuffle_i32x4(p0, p1, 0x88), _mm512_shuffle_i32x4(p0, p1, 0xdd));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dsel, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) _mm_storeu_ps(y + r * I8_ROWS, lane_sums(acc[r]));
}

// Q6_K: the 6-bit codes as codes_512 gives them (a row per lane, low = weights 0..15, high = 16..31).
// The two 16-weight halves have their own scales, so
// their sums stay in two vectors; each starts at -32 sum(x over the half) in one element per lane
// (x's per-call offsets xo), which makes it exactly sum((u - 32) x). Scales in the record's lane
// order (int8_q6_sc_index), spread per row lane by one permute each.
template <int R>
static inline void dot_group_q6_512(float* y, const int8_t* q, const float* xd, const int32_t* xo, int64_t K,
                                    const uint8_t* g) {
    const int64_t nb = K / QK;
    constexpr int64_t REC = int8_record_bytes(Q6_K), QB = int8_quant_bytes(Q6_K);
    const __m512i i0 = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5);
    const __m512i i1 = _mm512_setr_epi32(2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* qs = g + b * REC;
        __builtin_prefetch(qs + PREFETCH_AHEAD);
        __builtin_prefetch(qs + PREFETCH_AHEAD + 64);
        __m512i ulo, uhi;
        codes_512<Q6_K>(ulo, uhi, qs);
        const __m512 dw = per_lane(half4(qs + QB));
        const __m512 sc = _mm512_castps256_ps512(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qs + QB + 8)))));
        const __m512 s0 = _mm512_mul_ps(dw, _mm512_permutexvar_ps(i0, sc));
        const __m512 s1 = _mm512_mul_ps(dw, _mm512_permutexvar_ps(i1, sc));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const int8_t* xb = q + r * K + b * QK;
            const int32_t* o = xo + (r * nb + b) * 8;  // [32 S0, ., 32 S1, ...]
            const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)xb));
            const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(xb + 16)));
            const __m512i p0 = _mm512_dpbusd_epi32(_mm512_maskz_set1_epi32(0x1111, -o[0]), ulo, xl);
            const __m512i p1 = _mm512_dpbusd_epi32(_mm512_maskz_set1_epi32(0x1111, -o[2]), uhi, xh);
            const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), s1, _mm512_mul_ps(_mm512_cvtepi32_ps(p0), s0));
            acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(xd[r * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) _mm_storeu_ps(y + r * I8_ROWS, lane_sums(acc[r]));
}
// ---- the panel kernel: several rows of x against 16 output rows (4 groups) at once
//
// The loops above give each row of x a block of four weight rows per vpdpbusd, then pay a convert,
// a multiply and two FMAs for those 128 products: ~9 instructions a row of x per 128 weights, which
// is what a decode step of 8-16 sequences is made of. Here the codes of four groups' blocks are
// transposed in registers (16 unpacks a block, shared by every row of x) into 8 vectors of 4-byte
// quads, vector j holding weights 4j..4j+3 of all 16 output rows; a row of x then takes one vpdpbusd
// a quad (its 4 bytes broadcast) and one convert, multiply and FMA per block: 512 products in ~12
// instructions. The 16 sums of a vector sit in the transposed order p = 4 L + G (row L of group G),
// which every per-row scale follows and the final store undoes (one permute; the order is its own
// inverse). Offsets: Q4_0 and Q8_0 start each sum at -8 sum(q) and -128 sum(q), Q6_K its halves at
// -32 sum(q_h) (x's per-call integer offsets, int8_panel_offsets: exact); Q4_1 / Q4_K / Q5_K add
// m_w s_x in fp32 as the loops above do.

// the order of the panel's sums, and its own inverse: element p holds row 4 (p % 4) + p / 4
static inline __m512i panel_order() {
    return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}


// four fp16 per group at g[G] + off, in the panel's order
static inline __m512 panel_half(const uint8_t* const* g, int64_t off, __m512i order) {
    const __m256i h = _mm256_setr_epi64x(ld64(g[0] + off), ld64(g[1] + off), ld64(g[2] + off), ld64(g[3] + off));
    return _mm512_permutexvar_ps(order, _mm512_cvtph_ps(h));
}

// four uint8 per group at g[G] + off, in the panel's order
static inline __m512 panel_u8(const uint8_t* const* g, int64_t off, __m512i order) {
    int32_t v[4];
    for (int G = 0; G < 4; ++G) std::memcpy(&v[G], g[G] + off, 4);
    const __m128i b = _mm_setr_epi32(v[0], v[1], v[2], v[3]);
    return _mm512_permutexvar_ps(order, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)));
}

// t[j] (4 x 4 int32 per lane) = the transpose of a[G] within each 128-bit lane: element G of lane L of
// t[j] is element j of lane L of a[G]
static inline void transpose_lanes(__m512i* t, const __m512i* a) {
    const __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
    t[0] = _mm512_unpacklo_epi64(t0, t2);
    t[1] = _mm512_unpackhi_epi64(t0, t2);
    t[2] = _mm512_unpacklo_epi64(t1, t3);
    t[3] = _mm512_unpackhi_epi64(t1, t3);
}

// y [R][16] = R <= 8 quantized rows of x against the ng <= 4 groups from g0 (group stride gb; rows of
// missing groups are computed on the last group again and dropped by the caller). tc: null, or the
// panel's transcoded blocks (I8_PANEL_CACHE_BYTES each: the 8 quad vectors, then the scale vectors),
// written by the call with tc_fill and read back by the later calls for other rows of x (a prefill's
// chunks of 8 rows transcode each panel once)
template <int FMT, int R>
static void panel_512_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                        const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill) {
    const bool cached = tc && !tc_fill;
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    const __m512i order = panel_order();
    const uint8_t* g[4];
    for (int G = 0; G < 4; ++G) g[G] = g0 + (G < ng ? G : ng - 1) * gb;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const int64_t sbo = j * (HDR + SPAN * REC);
        __m512 dsb = _mm512_setzero_ps(), nmin = _mm512_setzero_ps();
        if (KQ && !cached) {  // the super-block's header: d, -dmin
            dsb = panel_half(g, sbo, order);
            nmin = _mm512_sub_ps(_mm512_setzero_ps(), panel_half(g, sbo + 8, order));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb, off = sbo + HDR + bb * REC;
            __m512i t[8];
            __m512 scale, scale1 = _mm512_setzero_ps(), offw = _mm512_setzero_ps();
            uint8_t* tcb = tc ? tc + b * I8_PANEL_CACHE_BYTES : nullptr;
            if (cached) {
                for (int k = 0; k < 8; ++k) t[k] = _mm512_loadu_si512(tcb + 64 * k);
                scale = _mm512_loadu_ps(tcb + 512);
                scale1 = _mm512_loadu_ps(tcb + 576);
                offw = _mm512_loadu_ps(tcb + 640);
            } else {
                __m512i lo[4], hi[4];
                // the panel reads its 4 groups side by side, so each group's stream runs at a quarter of
                // the pace: prefetch the next panel (the next 4 groups, contiguous) at the same pace
                // instead, one panel ahead, in its memory order
                for (int64_t l = 0; l < 4 * REC; l += 64) __builtin_prefetch(g0 + 4 * gb + 4 * off + l);
                for (int G = 0; G < 4; ++G) codes_512<FMT>(lo[G], hi[G], g[G] + off);
                transpose_lanes(t, lo);
                transpose_lanes(t + 4, hi);
                if constexpr (KQ) {
                    scale = _mm512_mul_ps(dsb, panel_u8(g, off + QB, order));
                    offw = _mm512_mul_ps(nmin, panel_u8(g, off + QB + 4, order));
                } else if constexpr (FMT == Q6_K) {
                    // the 8 int8 scales of groups 0, 1 and of 2, 3; element p = 4 L + G takes group G's
                    // int8_q6_sc_index(L, h) = (L % 2) 4 + 2 h + L / 2
                    const __m512i c01 = _mm512_cvtepi8_epi32(_mm_set_epi64x(ld64(g[1] + off + QB + 8), ld64(g[0] + off + QB + 8)));
                    const __m512i c23 = _mm512_cvtepi8_epi32(_mm_set_epi64x(ld64(g[3] + off + QB + 8), ld64(g[2] + off + QB + 8)));
                    const __m512i i0 = _mm512_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28, 1, 9, 17, 25, 5, 13, 21, 29);
                    const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(2));
                    const __m512 d = panel_half(g, off + QB, order);
                    scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(c01, i0, c23)));
                    scale1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(c01, i1, c23)));
                } else {
                    scale = panel_half(g, off + QB, order);
                    if constexpr (FMT == Q4_1) offw = panel_half(g, off + QB + 8, order);
                }
                if (tcb) {
                    for (int k = 0; k < 8; ++k) _mm512_storeu_si512(tcb + 64 * k, t[k]);
                    _mm512_storeu_ps(tcb + 512, scale);
                    _mm512_storeu_ps(tcb + 576, scale1);
                    _mm512_storeu_ps(tcb + 640, offw);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const int32_t* o = xo + (r * nb + b) * 4;  // int8_panel_offsets
                const __m512 dx = _mm512_set1_ps(xd[r * nb + b]);
                if constexpr (FMT == Q6_K) {
                    __m512i p0 = _mm512_set1_epi32(o[0]), p1 = _mm512_set1_epi32(o[1]);
                    for (int k = 0; k < 4; ++k) {
                        p0 = _mm512_dpbusd_epi32(p0, t[k], _mm512_set1_epi32(ld32(xb + 4 * k)));
                        p1 = _mm512_dpbusd_epi32(p1, t[4 + k], _mm512_set1_epi32(ld32(xb + 16 + 4 * k)));
                    }
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_mul_ps(scale, dx), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_mul_ps(scale1, dx), acc[r]);
                } else {
                    // two chains of four (a vpdpbusd's latency is several cycles: with one chain of eight
                    // per row, 8 rows kept too few in flight)
                    __m512i p = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
                    if constexpr (FMT == Q4_0) p = _mm512_set1_epi32(o[2]);  // -8 sum(q)
                    if constexpr (FMT == Q8_0) p = _mm512_set1_epi32(o[3]);  // -128 sum(q)
                    for (int k = 0; k < 4; ++k) {
                        p = _mm512_dpbusd_epi32(p, t[k], _mm512_set1_epi32(ld32(xb + 4 * k)));
                        p1 = _mm512_dpbusd_epi32(p1, t[4 + k], _mm512_set1_epi32(ld32(xb + 16 + 4 * k)));
                    }
                    p = _mm512_add_epi32(p, p1);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(scale, dx), acc[r]);
                    if constexpr (FMT == Q4_1 || KQ) acc[r] = _mm512_fmadd_ps(offw, _mm512_set1_ps(xs[r * nb + b]), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + 16 * r, _mm512_permutexvar_ps(order, acc[r]));
}

template <int FMT>
static void panel_512_f(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R,
                        int64_t K, const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill) {
    switch (R) {
        case 1: panel_512_r<FMT, 1>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 2: panel_512_r<FMT, 2>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 3: panel_512_r<FMT, 3>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 4: panel_512_r<FMT, 4>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 5: panel_512_r<FMT, 5>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 6: panel_512_r<FMT, 6>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 7: panel_512_r<FMT, 7>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        default: panel_512_r<FMT, 8>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
    }
}

static void panel(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                  const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill, int fmt) {
    if (fmt == Q8_0) panel_512_f<Q8_0>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q4_0) panel_512_f<Q4_0>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q4_1) panel_512_f<Q4_1>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q4_K) panel_512_f<Q4_K>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q5_K) panel_512_f<Q5_K>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else panel_512_f<Q6_K>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
}
#endif

#if I8_ISA == 1 || I8_ISA == 2
// ---- the panel kernel on 256-bit vectors (AVX2, AVX-VNNI): 8 output rows (2 groups) at once
//
// As panel_512_r with two 128-bit lanes: per block each group's codes are four vectors ([row 0 |
// row 1] and [row 2 | row 3], weights 0..15 and 16..31: codes_256), the two groups' vectors
// transposed within lanes into 8 vectors of quads (element p = 4 l + i holds group i / 2, row
// 2 (i % 2) + l), and a row of x takes one vpdpbusd per quad (AVX-VNNI) or one vpmaddubsw per quad
// with the int16 pair sums added across quads before one vpmaddwd (AVX2; codes below 16 allow 8
// quads, below 32 four, below 64 two, within int16). AVX2 leaves Q8_0 (codes up to 255) to
// dot_group. 4 rows of x a call: 16 ymm registers hold the 8 quad vectors and 4 rows' sums.

// the codes of one block of a group (int8_record): lo[0] = [row 0 | row 1] weights 0..15, lo[1] =
// [row 2 | row 3], hi[] weights 16..31; the high bits of Q5_K / Q6_K as codes_512 places them
// (int8_q5_qh_bit, int8_q6_qh_shift); Q8_0: w + 128
template <int FMT>
static inline void codes_256(__m256i* lo, __m256i* hi, const uint8_t* qs) {
    if constexpr (FMT == Q8_0) {
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        __m256i w[4];
        for (int r = 0; r < 4; ++r) w[r] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(qs + 32 * r)), flip);
        lo[0] = _mm256_permute2x128_si256(w[0], w[1], 0x20);
        hi[0] = _mm256_permute2x128_si256(w[0], w[1], 0x31);
        lo[1] = _mm256_permute2x128_si256(w[2], w[3], 0x20);
        hi[1] = _mm256_permute2x128_si256(w[2], w[3], 0x31);
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int v = 0; v < 2; ++v) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(qs + 32 * v));
        lo[v] = _mm256_and_si256(b, low);
        hi[v] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    }
    if constexpr (FMT == Q5_K) {  // bit 2v + l (lo) and 2v + 2 + l (hi) of the 16 qh bytes, lane l
        const __m256i bit = _mm256_set1_epi8(0x10);
        const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(qs + 64)));
        for (int v = 0; v < 2; ++v) {
            const __m256i sl = _mm256_setr_epi32(4 * v, 4 * v, 4 * v, 4 * v, 4 * v + 1, 4 * v + 1, 4 * v + 1, 4 * v + 1);
            const __m256i sh = _mm256_add_epi32(sl, _mm256_set1_epi32(2));
            lo[v] = _mm256_or_si256(lo[v], _mm256_and_si256(_mm256_slli_epi16(_mm256_srlv_epi32(h, sl), 4), bit));
            hi[v] = _mm256_or_si256(hi[v], _mm256_and_si256(_mm256_slli_epi16(_mm256_srlv_epi32(h, sh), 4), bit));
        }
    }
    if constexpr (FMT == Q6_K) {  // the 32 qh bytes are [even rows | odd rows]: shifts 0 / 2 (rows 0, 1), 4 / 6
        const __m256i high = _mm256_set1_epi8(0x30);
        const __m256i h = _mm256_loadu_si256((const __m256i*)(qs + 64));
        lo[0] = _mm256_or_si256(lo[0], _mm256_and_si256(_mm256_slli_epi16(h, 4), high));
        hi[0] = _mm256_or_si256(hi[0], _mm256_and_si256(_mm256_slli_epi16(h, 2), high));
        lo[1] = _mm256_or_si256(lo[1], _mm256_and_si256(h, high));
        hi[1] = _mm256_or_si256(hi[1], _mm256_and_si256(_mm256_srli_epi16(h, 2), high));
    }
}

// element p = 4 l + i of a panel vector holds output row 4 (i / 2) + 2 (i % 2) + l: the gather from
// group-major order, and its inverse for the store
static inline __m256i panel256_order() { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }
static inline __m256i panel256_unorder() { return _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); }

static inline __m256 panel256_half(const uint8_t* const* g, int64_t off, __m256i order) {
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_set_epi64x(ld64(g[1] + off), ld64(g[0] + off))), order);
}

static inline __m256 panel256_u8(const uint8_t* const* g, int64_t off, __m256i order) {
    int32_t v[2];
    std::memcpy(&v[0], g[0] + off, 4);
    std::memcpy(&v[1], g[1] + off, 4);
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(v[0], v[1], 0, 0)));
    return _mm256_permutevar8x32_ps(f, order);
}

// t[j]: within each 128-bit lane, element i is element j of a[i]
static inline void transpose_lanes_256(__m256i* t, const __m256i* a) {
    const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
    t[0] = _mm256_unpacklo_epi64(t0, t2);
    t[1] = _mm256_unpackhi_epi64(t0, t2);
    t[2] = _mm256_unpacklo_epi64(t1, t3);
    t[3] = _mm256_unpackhi_epi64(t1, t3);
}

// the int32 sums of quads k0 .. k0 + n - 1 of a row of x (x: that row's block) against t, added to p
template <int FMT>
static inline __m256i panel256_dot(__m256i p, const __m256i* t, const int8_t* x, int k0, int n) {
#if I8_ISA == 2
    for (int k = k0; k < k0 + n; ++k) p = _mm256_dpbusd_avx_epi32(p, t[k], _mm256_set1_epi32(ld32(x + 4 * k)));
    return p;
#else
    // int16 pair sums added across quads while they stay below 2^15: codes < 16 eight, < 32 four, < 64 two
    constexpr int SPAN16 = FMT == Q6_K ? 2 : FMT == Q5_K ? 4 : 8;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int k1 = k0; k1 < k0 + n; k1 += SPAN16) {
        __m256i s = _mm256_maddubs_epi16(t[k1], _mm256_set1_epi32(ld32(x + 4 * k1)));
        for (int k = k1 + 1; k < k1 + SPAN16 && k < k0 + n; ++k)
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(t[k], _mm256_set1_epi32(ld32(x + 4 * k))));
        p = _mm256_add_epi32(p, _mm256_madd_epi16(s, ones));
    }
    return p;
#endif
}

// y [R][16] (8 used) = R <= 4 quantized rows of x against the ng <= 2 groups from g0; tc as panel_512_r
template <int FMT, int R>
static void panel_256_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                        const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill) {
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    const bool cached = tc && !tc_fill;
    const __m256i order = panel256_order();
    const uint8_t* g[2] = {g0, g0 + (ng > 1 ? gb : 0)};
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const int64_t sbo = j * (HDR + SPAN * REC);
        __m256 dsb = _mm256_setzero_ps(), nmin = _mm256_setzero_ps();
        if (KQ && !cached) {
            dsb = panel256_half(g, sbo, order);
            nmin = _mm256_sub_ps(_mm256_setzero_ps(), panel256_half(g, sbo + 8, order));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb, off = sbo + HDR + bb * REC;
            __m256i t[8];
            __m256 scale, scale1 = _mm256_setzero_ps(), offw = _mm256_setzero_ps();
            uint8_t* tcb = tc ? tc + b * I8_PANEL_CACHE_BYTES : nullptr;
            if (cached) {
                for (int k = 0; k < 8; ++k) t[k] = _mm256_loadu_si256((const __m256i*)(tcb + 32 * k));
                scale = _mm256_loadu_ps((const float*)(tcb + 256));
                scale1 = _mm256_loadu_ps((const float*)(tcb + 288));
                offw = _mm256_loadu_ps((const float*)(tcb + 320));
            } else {
                for (int64_t l = 0; l < 2 * REC; l += 64) __builtin_prefetch(g0 + 2 * gb + 2 * off + l);
                __m256i lo[4], hi[4];
                codes_256<FMT>(lo, hi, g[0] + off);
                codes_256<FMT>(lo + 2, hi + 2, g[1] + off);
                transpose_lanes_256(t, lo);
                transpose_lanes_256(t + 4, hi);
                if constexpr (KQ) {
                    scale = _mm256_mul_ps(dsb, panel256_u8(g, off + QB, order));
                    offw = _mm256_mul_ps(nmin, panel256_u8(g, off + QB + 4, order));
                } else if constexpr (FMT == Q6_K) {
                    // group i / 2's int8_q6_sc_index(L, h) = 4 l + 2 h + i % 2 (L = 2 (i % 2) + l)
                    const __m256i c0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(g[0] + off + QB + 8)));
                    const __m256i c1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(g[1] + off + QB + 8)));
                    const __m256i i0 = _mm256_setr_epi32(0, 1, 0, 1, 4, 5, 4, 5);
                    const __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(2));
                    const __m256 d = panel256_half(g, off + QB, order);
                    scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_blend_epi32(
                        _mm256_permutevar8x32_epi32(c0, i0), _mm256_permutevar8x32_epi32(c1, i0), 0xcc)));
                    scale1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_blend_epi32(
                        _mm256_permutevar8x32_epi32(c0, i1), _mm256_permutevar8x32_epi32(c1, i1), 0xcc)));
                } else {
                    scale = panel256_half(g, off + QB, order);
                    if constexpr (FMT == Q4_1) offw = panel256_half(g, off + QB + 8, order);
                }
                if (tcb) {
                    for (int k = 0; k < 8; ++k) _mm256_storeu_si256((__m256i*)(tcb + 32 * k), t[k]);
                    _mm256_storeu_ps((float*)(tcb + 256), scale);
                    _mm256_storeu_ps((float*)(tcb + 288), scale1);
                    _mm256_storeu_ps((float*)(tcb + 320), offw);
                }
            }
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const int32_t* o = xo + (r * nb + b) * 4;  // int8_panel_offsets
                const __m256 dx = _mm256_set1_ps(xd[r * nb + b]);
                if constexpr (FMT == Q6_K) {
                    const __m256i p0 = panel256_dot<FMT>(_mm256_set1_epi32(o[0]), t, xb, 0, 4);
                    const __m256i p1 = panel256_dot<FMT>(_mm256_set1_epi32(o[1]), t, xb, 4, 4);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(scale, dx), acc[r]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(scale1, dx), acc[r]);
                } else {
                    __m256i p = _mm256_setzero_si256();
                    if constexpr (FMT == Q4_0) p = _mm256_set1_epi32(o[2]);  // -8 sum(q)
                    if constexpr (FMT == Q8_0) p = _mm256_set1_epi32(o[3]);  // -128 sum(q)
                    p = panel256_dot<FMT>(p, t, xb, 0, 8);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(scale, dx), acc[r]);
                    if constexpr (FMT == Q4_1 || KQ) acc[r] = _mm256_fmadd_ps(offw, _mm256_set1_ps(xs[r * nb + b]), acc[r]);
                }
            }
        }
    }
    const __m256i unorder = panel256_unorder();
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + 16 * r, _mm256_permutevar8x32_ps(acc[r], unorder));
}

template <int FMT>
static void panel_256_f(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R,
                        int64_t K, const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill) {
    switch (R) {
        case 1: panel_256_r<FMT, 1>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 2: panel_256_r<FMT, 2>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        case 3: panel_256_r<FMT, 3>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
        default: panel_256_r<FMT, 4>(y, q, xd, xs, xo, K, g0, gb, ng, tc, tc_fill); break;
    }
}

static void panel(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                  const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill, int fmt) {
#if I8_ISA == 2
    if (fmt == Q8_0) panel_256_f<Q8_0>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else
#endif
    if (fmt == Q4_0) panel_256_f<Q4_0>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q4_1) panel_256_f<Q4_1>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q4_K) panel_256_f<Q4_K>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else if (fmt == Q5_K) panel_256_f<Q5_K>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
    else panel_256_f<Q6_K>(y, q, xd, xs, xo, R, K, g0, gb, ng, tc, tc_fill);
}
#endif

template <int R>
static inline void dot_group_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                               const uint8_t* g, int fmt) {
#if I8_ISA == 3
    if (fmt == Q8_0) dot_group_q8_512<R>(y, q, xd, K, g);
    else if (fmt == Q4_0) dot_group_q4_512<Q4_0, R>(y, q, xd, xs, K, g);
    else if (fmt == Q4_1) dot_group_q4_512<Q4_1, R>(y, q, xd, xs, K, g);
    else if (fmt == Q4_K) dot_group_q4_512<Q4_K, R>(y, q, xd, xs, K, g);
    else if (fmt == Q5_K) dot_group_q4_512<Q5_K, R>(y, q, xd, xs, K, g);
    else dot_group_q6_512<R>(y, q, xd, xo, K, g);
#else
    if (fmt == Q8_0) dot_group_q8<R>(y, q, xd, K, g);
    else if (fmt == Q4_0) dot_group_q4<Q4_0, R>(y, q, xd, xs, K, g);
    else if (fmt == Q4_1) dot_group_q4<Q4_1, R>(y, q, xd, xs, K, g);
    else if (fmt == Q4_K) dot_group_q4<Q4_K, R>(y, q, xd, xs, K, g);
    else if (fmt == Q5_K) dot_group_q4<Q5_K, R>(y, q, xd, xs, K, g);
    else dot_group_q6<R>(y, q, xd, xo, K, g);
#endif
}

static void dot_group(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                      const uint8_t* g, int fmt) {
    switch (R) {
        case 1: dot_group_r<1>(y, q, xd, xs, xo, K, g, fmt); break;
        case 2: dot_group_r<2>(y, q, xd, xs, xo, K, g, fmt); break;
        case 3: dot_group_r<3>(y, q, xd, xs, xo, K, g, fmt); break;
        default: dot_group_r<4>(y, q, xd, xs, xo, K, g, fmt); break;
    }
}

#endif
