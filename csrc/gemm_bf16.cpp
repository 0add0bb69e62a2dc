// The avx512bf16 kernel path: the avx512 kernel table with one more kernel, a bf16 x bf16 GEMM on
// vdpbf16ps (AVX512-BF16: Cooper Lake, Sapphire Rapids and later Xeons, Zen 4/5). Chosen at run time
// only where the CPU reports avx512bf16 (bindings.cpp, usable_paths); everything else -- decode
// (M <= 16, the GEMV: 1.5x this GEMM at 8 rows, equal at 16), other dtypes and weight formats -- is the avx512 table's.
//
// vdpbf16ps multiplies pairs of bf16 values exactly (8-bit significands: a product fits fp32's 24)
// and adds the pair's two products to an fp32 accumulator, rounding to nearest even; it treats
// subnormal bf16 inputs as zero and flushes subnormal results (below 1.2e-38), which no bf16 model
// activation reaches. Twice the multiply-adds of an fp32 FMA per instruction: the avx512 path converts
// bf16 to fp32 and runs the fp32 GEMM (torch / oneDNN reach ~2x that here with this instruction).
//
// Layout. W is packed as every dense weight is (pack_dense: panels [ceil(N/32)][K][32] bf16); each
// [kc][32] block of a panel is interleaved once per task into k-pairs, [kc/2][32 pairs] (two 512-bit
// vectors per pair of k: outputs 0..15 and 16..31), an odd last k paired with zero. x is read in
// place, a pair (x[m, k], x[m, k + 1]) broadcast as one 32-bit value; an odd K goes through a copy
// padded with a zero column. The register tile: 12 rows x 32 outputs, 24 accumulators.
#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")

namespace pi_avx512bf16 {

static const int64_t KC = 256;       // k per block: [128 pairs][32] bf16 = 16 KiB
static const int MR = 12;            // rows of the register tile
static const int64_t MC_MAX = 1024;  // rows per task at most (a 1024 x 32 fp32 tile: 128 KiB, L2)

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static inline __m512 to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// 16 fp32 -> bf16, rounded to nearest even, NaN kept a (quiet) NaN: common.h's f32_to_bf16, as every
// path stores bf16 (not vcvtneps2bf16, which flushes subnormal results)
static inline __m256i to_bf16(__m512 a) {
    const __m512i u = _mm512_castps_si512(a);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// dst [ceil(kc/2)][64] = rows k0, k0 + 1 of src [kc][32] interleaved: dst[j][2n + t] = src[2j + t][n]
static void pack_pairs(uint16_t* dst, const uint16_t* src, int64_t kc) {
    alignas(64) static const uint16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    alignas(64) static const uint16_t hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
    for (int64_t k = 0; k < kc; k += 2) {
        const __m512i a = _mm512_loadu_si512(src + k * PANEL);
        const __m512i b = k + 1 < kc ? _mm512_loadu_si512(src + (k + 1) * PANEL) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + k * PANEL, _mm512_permutex2var_epi16(a, ilo, b));
        _mm512_storeu_si512(dst + k * PANEL + 32, _mm512_permutex2var_epi16(a, ihi, b));
    }
}

// y [rows][N] columns n0 .. n0 + 31 (those below N) = acc [rows][32] + bias [n0 ..], as bf16
static void store_rows(uint16_t* y, const float* acc, const uint16_t* bias, int64_t rows, int64_t N, int64_t n0) {
    const int64_t n = imin(PANEL, N - n0);
    const __mmask16 k0 = (__mmask16)((1u << imin(16, n)) - 1), k1 = (__mmask16)((1u << imax(0, n - 16)) - 1);
    const __m512 b0 = bias ? to_f32(_mm256_maskz_loadu_epi16(k0, bias + n0)) : _mm512_setzero_ps();
    const __m512 b1 = bias ? to_f32(_mm256_maskz_loadu_epi16(k1, bias + n0 + 16)) : _mm512_setzero_ps();
    for (int64_t m = 0; m < rows; ++m) {
        const float* a = acc + m * PANEL;
        _mm256_mask_storeu_epi16(y + m * N + n0, k0, to_bf16(_mm512_add_ps(_mm512_loadu_ps(a), b0)));
        _mm256_mask_storeu_epi16(y + m * N + n0 + 16, k1, to_bf16(_mm512_add_ps(_mm512_loadu_ps(a + 16), b1)));
    }
}

// acc [R][32] (+)= A [R rows, lda][2 kp] x B [kp][64]: per pair of k, two loads of B, one 32-bit
// broadcast of A per row, two vdpbf16ps per row
template <int R>
static inline void micro_kernel(float* acc, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t kp, bool init) {
    __m512 c[R][2];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
        c[r][0] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * PANEL);
        c[r][1] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * PANEL + 16);
    }
    for (int64_t j = 0; j < kp; ++j) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + j * 64);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + j * 64 + 32);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            int32_t pair;
            std::memcpy(&pair, A + r * lda + 2 * j, 4);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
            c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(acc + r * PANEL, c[r][0]);
        _mm512_storeu_ps(acc + r * PANEL + 16, c[r][1]);
    }
}

template <int R>
static inline void micro_dispatch(int r, float* acc, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t kp,
                                  bool init) {
    if (r == R) micro_kernel<R>(acc, A, lda, B, kp, init);
    else if constexpr (R > 1) micro_dispatch<R - 1>(r, acc, A, lda, B, kp, init);
}

// out [M, N] bf16 = x [M, K] bf16 (row stride xs) @ W^T + bias (bf16 [N] or null); W: pack_dense's
// bf16 panels. Tasks as kernels_impl.h's gemm: (panel, chunk of rows), rows chunked only when there
// are too few panels for the threads.
static void gemm_bf16(void* out, const uint16_t* x, int64_t xs, const uint16_t* P, const uint16_t* bias, int64_t M,
                      int64_t N, int64_t K) {
    const int64_t panels = ceil_div(N, PANEL), threads = pool_threads();
    const uint16_t* A = x;
    int64_t lda = xs;
    // x is read in place, except through a copy with a padded stride when K is odd (a zero column makes
    // the last pair whole) or its rows are a multiple of 1 KiB apart (the tile's 12 rows would share L1
    // sets: 4K aliasing)
    if (K % 2 || (xs * 2) % 1024 == 0) {
        const int64_t ld = (K + 1) / 2 * 2 + 32;
        uint16_t* buf = (uint16_t*)scratch(0, 1, (size_t)(M * ld) / 2 + 1);
        for (int64_t m = 0; m < M; ++m) {
            std::memcpy(buf + m * ld, x + m * xs, (size_t)K * 2);
            buf[m * ld + K] = 0;
        }
        A = buf;
        lda = ld;
    }
    int64_t mc = imin(M, MC_MAX);
    if (panels < 2 * threads) mc = imin(mc, imax(MR, ceil_div(ceil_div(M, ceil_div(2 * threads, panels)), MR) * MR));
    const int64_t mchunks = ceil_div(M, mc);
    auto task = [&](int64_t t, int thread) {
        const int64_t p = t / mchunks, m0 = (t % mchunks) * mc, m1 = imin(M, m0 + mc);
        float* acc = scratch(thread, 3, (size_t)(mc * PANEL));
        uint16_t* B = (uint16_t*)scratch(thread, 2, (size_t)(KC * PANEL / 2));
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = imin(KC, K - k0), kp = ceil_div(kc, 2);
            pack_pairs(B, P + (p * K + k0) * PANEL, kc);
            // tiles of as equal a height as MR allows (256 rows: 14 of 12 and 8 of 11, not 21 of 12 and
            // one of 4, whose 8 accumulators cannot hide vdpbf16ps' latency)
            const int64_t tiles = ceil_div(m1 - m0, MR), base = (m1 - m0) / tiles, extra = (m1 - m0) % tiles;
            // the next k-block of the panel (kc x 32 bf16), prefetched a share per tile while these compute
            const char* next = (const char*)(P + (p * K + k0 + KC) * PANEL);
            const int64_t next_lines = k0 + KC < K ? imin(KC, K - k0 - KC) * PANEL * 2 / 64 : 0;
            const int64_t per_tile = ceil_div(next_lines, tiles);
            for (int64_t t = 0, m = m0; t < tiles; ++t) {
                for (int64_t l = t * per_tile; l < imin(next_lines, (t + 1) * per_tile); ++l)
                    __builtin_prefetch(next + l * 64);
                const int r = (int)(base + (t < extra));
                micro_dispatch<MR>(r, acc + (m - m0) * PANEL, A + m * lda + k0, lda, B, kp, k0 == 0);
                m += r;
            }
        }
        store_rows((uint16_t*)out + m0 * N, acc, bias, m1 - m0, N, p * PANEL);
    };
    parallel_for(panels * mchunks, [](void* ctx, int64_t t, int thread) { (*(decltype(task)*)ctx)(t, thread); },
                 &task);
}

static void linear(void* out, const void* x, const void* weights, const void* bias, int64_t M, int64_t N, int64_t K,
                   int64_t xs, int adt, int wfmt) {
    if (bf16_gemm_takes(M, K, adt, wfmt)) {
        gemm_bf16(out, (const uint16_t*)x, xs, (const uint16_t*)weights, (const uint16_t*)bias, M, N, K);
        return;
    }
    table_avx512()->linear(out, x, weights, bias, M, N, K, xs, adt, wfmt);
}

static KernelTable make_table() {
    KernelTable t = *table_avx512();
    t.name = "avx512bf16";
    t.linear = linear;
    return t;
}

// The instruction's own ceiling (bench/cpu_kernels.py): `iters` rounds of 24 independent vdpbf16ps
// chains, registers only (no load, no store: nothing a GEMM could do faster). Returns a sum of the
// accumulators so that nothing is optimized away.
static float dot_peak(int64_t iters, float seed) {
    __m512 c[24];
    for (int j = 0; j < 24; ++j) c[j] = _mm512_set1_ps(seed * (float)j);
    const __m512bh a = (__m512bh)_mm512_set1_epi32((int32_t)0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 24
        for (int j = 0; j < 24; ++j) c[j] = _mm512_dpbf16_ps(c[j], a, b);
    }
    __m512 t = c[0];
    for (int j = 1; j < 24; ++j) t = _mm512_add_ps(t, c[j]);
    return _mm512_reduce_add_ps(t);
}

}  // namespace pi_avx512bf16

#pragma GCC pop_options

// flops of the probe on every pool thread at once: iters x 24 instructions x 16 lanes x 2 pairs x 2
double bf16_dot_peak_flops(int64_t iters) {
    struct Ctx {
        int64_t iters;
        float sink[256];
    } ctx{iters, {}};
    const int threads = pool_threads();
    parallel_for(threads, [](void* p, int64_t t, int) {
        Ctx& c = *(Ctx*)p;
        c.sink[t % 256] = pi_avx512bf16::dot_peak(c.iters, (float)t);
    }, &ctx);
    return (double)threads * (double)iters * 24.0 * 64.0;
}

void bf16_pack_pairs(uint16_t* dst, const uint16_t* src, int64_t kc) { pi_avx512bf16::pack_pairs(dst, src, kc); }
void bf16_store_rows(uint16_t* y, const float* acc, const uint16_t* bias, int64_t rows, int64_t N, int64_t n0) {
    pi_avx512bf16::store_rows(y, acc, bias, rows, N, n0);
}

const KernelTable* table_avx512bf16() {
    static const KernelTable table = pi_avx512bf16::make_table();
    return &table;
}
#endif
