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

#if I8_ISA == 0

static void panel(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                  const uint8_t* p, int fmt) {
    const int64_t nb = K / QK;
    float acc[I8_PANEL_ROWS][I8_ROWS] = {};
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* rec = p + int8_record_offset(fmt, b);
        for (int i = 0; i < I8_ROWS; ++i) {
            int u[QK];
            for (int t = 0; t < QK; ++t) u[t] = int8_code(rec, i, t, fmt);
            float scale, scale1, offw;
            int8_record_scales(scale, scale1, offw, p, b, i, fmt);
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

// The vector width of a path (Vw): the panel's 16 rows in one zmm (AVX512-VNNI) or in two halves of
// 8 rows, one ymm each (AVX-VNNI, AVX2: the low and high 32 bytes of each code vector). The kernel
// below is written once over Vw. A row of x takes one dot-product instruction a quad (its 4 bytes
// broadcast: vpdpbusd, or on AVX2 vpmaddubsw with the int16 pair sums added across quads while they
// stay below 2^15 -- codes < 16: eight, < 32: four, < 64: two -- before one vpmaddwd), then one
// convert, multiply and FMA per block (Q4_1 and the K-quants one more FMA for the offset, Q6_K one a
// half): on zmm 512 multiply-adds in ~13 instructions. The codes are decoded once per block for the
// R rows of x: the nibbles a mask and a shift, Q5_K's fifth bits and Q6_K's high bits one shift and
// mask a vector. AVX2 takes Q8_0's codes (up to 255, which would overflow vpmaddubsw) signed: |w|
// against x with w's sign.
#if I8_ISA == 3
struct Vw {
    using I = __m512i;
    using F = __m512;
    static constexpr int LANES = 16;  // output rows a vector holds
    static constexpr int ROWS = 8;    // rows of x a call: 8 quad vectors, 8 rows' sums and the scales in 32 zmm
    static constexpr bool SIGNED_Q8 = false;
    static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
    static I and_(I a, I b) { return _mm512_and_si512(a, b); }
    static I or_(I a, I b) { return _mm512_or_si512(a, b); }
    static I bytes(char c) { return _mm512_set1_epi8(c); }
    static I high_nibbles(I v) { return _mm512_srli_epi16(v, 4); }
    template <int N> static I shift(I a) {  // each 32-bit element left by N (right by -N)
        if constexpr (N > 0) return _mm512_slli_epi32(a, N);
        else if constexpr (N < 0) return _mm512_srli_epi32(a, -N);
        else return a;
    }
    static I set1(int32_t v) { return _mm512_set1_epi32(v); }
    static I zero_i() { return _mm512_setzero_si512(); }
    static F zero() { return _mm512_setzero_ps(); }
    static F half(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static F u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
    static F i8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
    static F set1f(float v) { return _mm512_set1_ps(v); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
    static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
    // the int32 sums of quads k0 .. k0 + n - 1 of a row of x (x: that row's block) against t, added to
    // p; all eight in two chains of four (one chain of eight left too few in flight for vpdpbusd's latency)
    template <int FMT> static I dot(I p, const I* t, const int8_t* x, int k0, int n) {
        if (n == 8) {
            I p1 = zero_i();
            for (int k = k0; k < k0 + 4; ++k) {
                p = _mm512_dpbusd_epi32(p, t[k], set1(ld32(x + 4 * k)));
                p1 = _mm512_dpbusd_epi32(p1, t[4 + k], set1(ld32(x + 16 + 4 * k)));
            }
            return _mm512_add_epi32(p, p1);
        }
        for (int k = k0; k < k0 + n; ++k) p = _mm512_dpbusd_epi32(p, t[k], set1(ld32(x + 4 * k)));
        return p;
    }
};
#else
struct Vw {
    using I = __m256i;
    using F = __m256;
    static constexpr int LANES = 8;  // output rows a vector holds: half a panel
    static constexpr int ROWS = 4;   // rows of x a call: 8 quad vectors and 4 rows' sums in 16 ymm
    static constexpr bool SIGNED_Q8 = I8_ISA == 1;
    static I load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
    static I and_(I a, I b) { return _mm256_and_si256(a, b); }
    static I or_(I a, I b) { return _mm256_or_si256(a, b); }
    static I bytes(char c) { return _mm256_set1_epi8(c); }
    static I high_nibbles(I v) { return _mm256_srli_epi16(v, 4); }
    template <int N> static I shift(I a) {
        if constexpr (N > 0) return _mm256_slli_epi32(a, N);
        else if constexpr (N < 0) return _mm256_srli_epi32(a, -N);
        else return a;
    }
    static I set1(int32_t v) { return _mm256_set1_epi32(v); }
    static I zero_i() { return _mm256_setzero_si256(); }
    static F zero() { return _mm256_setzero_ps(); }
    static F half(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static F u8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
    static F i8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
    static F set1f(float v) { return _mm256_set1_ps(v); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
    static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
    template <int FMT> static I dot(I p, const I* t, const int8_t* x, int k0, int n) {
#if I8_ISA == 2
        for (int k = k0; k < k0 + n; ++k) p = _mm256_dpbusd_avx_epi32(p, t[k], set1(ld32(x + 4 * k)));
        return p;
#else
        const __m256i ones = _mm256_set1_epi16(1);
        if constexpr (FMT == Q8_0) {  // t holds w + 128: signed w, |w| <= 128 against x with w's sign
            const __m256i flip = bytes((char)0x80);
            for (int k = k0; k < k0 + n; ++k) {
                const __m256i w = _mm256_xor_si256(t[k], flip), xk = set1(ld32(x + 4 * k));
                p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xk, w)), ones));
            }
            return p;
        }
        constexpr int SPAN16 = FMT == Q6_K ? 2 : FMT == Q5_K ? 4 : 8;
        for (int k1 = k0; k1 < k0 + n; k1 += SPAN16) {
            __m256i s = _mm256_maddubs_epi16(t[k1], set1(ld32(x + 4 * k1)));
            for (int k = k1 + 1; k < k1 + SPAN16 && k < k0 + n; ++k)
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(t[k], set1(ld32(x + 4 * k))));
            p = _mm256_add_epi32(p, _mm256_madd_epi16(s, ones));
        }
        return p;
#endif
    }
};
#endif

// the 8 quad vectors of one record's Vw::LANES rows at rec (unsigned codes, t[j]: weights 4j .. 4j+3)
template <int FMT>
static inline void codes(Vw::I* t, const uint8_t* rec) {
    if constexpr (FMT == Q8_0) {
        for (int j = 0; j < 8; ++j) t[j] = Vw::load(rec + 64 * j);
        return;
    }
    const Vw::I low = Vw::bytes(0x0f);
    for (int j = 0; j < 4; ++j) {
        const Vw::I v = Vw::load(rec + 64 * j);
        t[j] = Vw::and_(v, low);
        t[4 + j] = Vw::and_(Vw::high_nibbles(v), low);
    }
    if constexpr (FMT == Q5_K) {  // bit j of each byte, moved to bit 4
        const Vw::I h = Vw::load(rec + 256), bit = Vw::bytes(0x10);
        t[0] = Vw::or_(t[0], Vw::and_(Vw::shift<4>(h), bit));
        t[1] = Vw::or_(t[1], Vw::and_(Vw::shift<3>(h), bit));
        t[2] = Vw::or_(t[2], Vw::and_(Vw::shift<2>(h), bit));
        t[3] = Vw::or_(t[3], Vw::and_(Vw::shift<1>(h), bit));
        t[4] = Vw::or_(t[4], Vw::and_(h, bit));
        t[5] = Vw::or_(t[5], Vw::and_(Vw::shift<-1>(h), bit));
        t[6] = Vw::or_(t[6], Vw::and_(Vw::shift<-2>(h), bit));
        t[7] = Vw::or_(t[7], Vw::and_(Vw::shift<-3>(h), bit));
    }
    if constexpr (FMT == Q6_K) {  // bits 2j, 2j+1 of each byte of vector v, moved to bits 4, 5
        const Vw::I two = Vw::bytes(0x30);
        for (int v = 0; v < 2; ++v) {
            const Vw::I h = Vw::load(rec + 256 + 64 * v);
            t[4 * v + 0] = Vw::or_(t[4 * v + 0], Vw::and_(Vw::shift<4>(h), two));
            t[4 * v + 1] = Vw::or_(t[4 * v + 1], Vw::and_(Vw::shift<2>(h), two));
            t[4 * v + 2] = Vw::or_(t[4 * v + 2], Vw::and_(h, two));
            t[4 * v + 3] = Vw::or_(t[4 * v + 3], Vw::and_(Vw::shift<-2>(h), two));
        }
    }
}

// y [R][16] columns L h .. L h + L - 1 (L = Vw::LANES) = R <= Vw::ROWS rows of x against rows L h ..
// of the panel at p: its codes at 4 L h bytes into each vector, its scales L h entries into each array
template <int FMT, int R>
static void lanes_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                    const uint8_t* p, int h) {
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    const int64_t lh = Vw::LANES * h;  // the first row of these lanes
    Vw::F acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vw::zero();
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const uint8_t* sb = p + j * (HDR + SPAN * REC);
        Vw::F dsb = Vw::zero(), nmin = Vw::zero();
        if constexpr (KQ) {  // the super-block's header: d, -dmin
            dsb = Vw::half(sb + 2 * lh);
            nmin = Vw::sub(Vw::zero(), Vw::half(sb + 32 + 2 * lh));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb;
            const uint8_t* rec = sb + HDR + bb * REC;
            if (h == 0)
                for (int64_t l = 0; l < REC; l += 64) __builtin_prefetch(rec + PREFETCH_AHEAD + l);
            Vw::I t[8];
            codes<FMT>(t, rec + 4 * lh);
            Vw::F scale, scale1 = Vw::zero(), offw = Vw::zero();
            if constexpr (KQ) {
                scale = Vw::mul(dsb, Vw::u8(rec + QB + lh));
                offw = Vw::mul(nmin, Vw::u8(rec + QB + 16 + lh));
            } else if constexpr (FMT == Q6_K) {
                const Vw::F d = Vw::half(rec + QB + 2 * lh);
                scale = Vw::mul(d, Vw::i8(rec + QB + 32 + lh));
                scale1 = Vw::mul(d, Vw::i8(rec + QB + 48 + lh));
            } else {
                scale = Vw::half(rec + QB + 2 * lh);
                if constexpr (FMT == Q4_1) offw = Vw::half(rec + QB + 32 + 2 * lh);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const int8_t* xb = q + r * K + b * QK;
                const int32_t* o = xo + (r * nb + b) * 4;  // int8_panel_offsets
                const Vw::F dx = Vw::set1f(xd[r * nb + b]);
                if constexpr (FMT == Q6_K) {
                    const Vw::I p0 = Vw::dot<FMT>(Vw::set1(o[0]), t, xb, 0, 4);
                    const Vw::I p1 = Vw::dot<FMT>(Vw::set1(o[1]), t, xb, 4, 4);
                    acc[r] = Vw::fmadd(Vw::cvt(p0), Vw::mul(scale, dx), acc[r]);
                    acc[r] = Vw::fmadd(Vw::cvt(p1), Vw::mul(scale1, dx), acc[r]);
                } else {
                    Vw::I p0 = Vw::zero_i();
                    if constexpr (FMT == Q4_0) p0 = Vw::set1(o[2]);                     // -8 sum(q)
                    if constexpr (FMT == Q8_0 && !Vw::SIGNED_Q8) p0 = Vw::set1(o[3]);  // -128 sum(q)
                    p0 = Vw::dot<FMT>(p0, t, xb, 0, 8);
                    acc[r] = Vw::fmadd(Vw::cvt(p0), Vw::mul(scale, dx), acc[r]);
                    if constexpr (FMT == Q4_1 || KQ) acc[r] = Vw::fmadd(offw, Vw::set1f(xs[r * nb + b]), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r) Vw::store(y + 16 * r + lh, acc[r]);
}

template <int FMT, int R>
static void panel_r(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int64_t K,
                    const uint8_t* p) {
    for (int h = 0; h < I8_ROWS / Vw::LANES; ++h) lanes_r<FMT, R>(y, q, xd, xs, xo, K, p, h);
}

static constexpr int PANEL_ROWS = Vw::ROWS;

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
