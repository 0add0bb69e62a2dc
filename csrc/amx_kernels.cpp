// The AMX kernels (amx.h): bf16 x bf16 GEMM on TDPBF16PS and the int8 route's panels on TDPBSUD,
// each written once over a tile unit U -- HwTiles (the instructions) or EmuTiles (their documented
// semantics in plain C++, for tests and for the self-check's expected answers).
//
// Tiles. A tile is up to 16 rows of up to 64 bytes, shaped by the thread's configuration (ldtilecfg).
//   TDPBF16PS C, A, B: C [m][n] fp32 += sum over k-pairs j of A [m][2j, 2j+1] . B [j][2n, 2n+1] (bf16)
//   TDPBSUD   C, A, B: C [m][n] int32 += sum over quads j of A [m][4j..4j+3] (int8) . B [j][4n..4n+3] (uint8)
// B's layout -- k-pairs or k-quads of 16 output columns a 64-byte row -- is the one the other paths
// already use: gemm_bf16.cpp's interleaved pairs (a 32-column panel: two tiles, 64 bytes apart, row
// stride 128) and the int8 route's code vectors (int8.h: vector j = weights 4j..4j+3 of the panel's
// 16 rows, which is B's row j). So no weight is repacked for AMX.
//
// bf16 GEMM: x is copied once into a buffer of whole tiles (rows to a multiple of 16, k to a multiple
// of 32, both zero-filled); tasks as gemm_bf16.cpp's (a 32-column panel x a chunk of rows), per k-block
// of 512 the panel's pairs interleaved once, then 32 rows x 32 columns at a time: C in tiles 0-3, two
// A tiles (4, 5), two B tiles (6, 7), four TDPBF16PS per 32 k; fp32 sums kept in the task's
// accumulator between k-blocks.
//
// int8 panels: per 32-weight block (Q6_K: per 16-weight half, two scales) one TDPBSUD of R rows of
// the quantized x against the block's 16 rows of codes (Q8_0's straight from the panel; the 4-bit and
// K-quant codes decoded by the AVX512-VNNI path's `codes` into a 512-byte buffer), the int32 sums
// stored and scaled in fp32 exactly as that path does: the same bits as avx512vnni for every format.
// Fewer than AMX_MIN_ROWS (16) rows of x run on the AVX512-VNNI kernel: a block's tile round is a
// chain (load, dot, store, read back) that only a full tile of rows is sure to pay for.
//
// Never run on AMX hardware by its authors (no Sapphire Rapids was at hand): the self-check (amx.cpp)
// is what stands between an error here and wrong numbers on such a machine.
#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "amx.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")

// the int8 route's AVX512-VNNI code (quantize_row, codes, the panel kernel for a few rows), compiled
// again in this file
namespace pi_amx_vnni {
#define I8_ISA 3
#include "int8_impl.h"
#undef I8_ISA
}  // namespace pi_amx_vnni

namespace pi_amx {

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ldtilecfg's 64 bytes: palette 1, then per tile its bytes a row (colsb) and rows; unused tiles zero
struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

static TileConfig tile_config(std::initializer_list<std::initializer_list<int>> tiles) {
    TileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    int t = 0;
    for (const auto& shape : tiles) {  // {rows, bytes a row}
        c.rows[t] = (uint8_t)*shape.begin();
        c.colsb[t] = (uint16_t)*(shape.begin() + 1);
        ++t;
    }
    return c;
}

// The instructions (binutils >= 2.36 assembles them; no compiler intrinsic is needed, and these
// clobber memory where they touch it, which GCC's tile macros do not say)
struct HwTiles {
    static void configure(const TileConfig* c) { asm volatile("ldtilecfg %0" ::"m"(*c)); }
    static void release() { asm volatile("tilerelease" ::: "memory"); }
    template <int T> static void zero() { asm volatile("tilezero %%tmm%c0" ::"i"(T)); }
    template <int T> static void load(const void* p, int64_t stride) {
        asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
    }
    template <int T> static void store(void* p, int64_t stride) {
        asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
    }
    template <int C, int A, int B> static void dp_bf16() {
        asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
    }
    template <int C, int A, int B> static void dp_su8() {
        asm volatile("tdpbsud %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
    }
    // the int8 configuration this thread's tiles hold (16 + R; 0 none or another): reloaded on change
    static int& loaded() {
        static thread_local int key = 0;
        return key;
    }
};

// The software tile unit: eight tiles of 16 x 64 bytes a thread, shaped by the configuration as the
// hardware's are; a shape the instructions would fault on (#UD) aborts with a message, since the
// hardware would kill the process there too. TDPBF16PS as Intel's pseudo-code: per k-pair, the even
// then the odd product added in fp32 (each product exact: 8-bit significands), bf16 inputs below
// 2^-126 read as zero (DAZ), results below it flushed to zero (FTZ), round to nearest even.
struct EmuTiles {
    struct State {
        TileConfig cfg;
        bool configured;
        alignas(64) uint8_t t[8][16][64];
    };
    static State& s() {
        static thread_local State st{};
        return st;
    }
    [[noreturn]] static void fail(const char* what, int tile) {
        std::fprintf(stderr, "portinfer: AMX emulation: %s (tile %d)\n", what, tile);
        std::abort();
    }
    static void configure(const TileConfig* c) {
        State& st = s();
        if (c->palette != 1) fail("palette must be 1", -1);
        for (int t = 0; t < 16; ++t)
            if (c->rows[t] > 16 || c->colsb[t] > 64 || (t >= 8 && (c->rows[t] || c->colsb[t])))
                fail("a tile shape past 16 rows x 64 bytes", t);
        st.cfg = *c;
        st.configured = true;
        std::memset(st.t, 0, sizeof st.t);
    }
    static void release() { s().configured = false; }
    static void shape(int T, int& rows, int& colsb) {
        const State& st = s();
        if (!st.configured) fail("tile used with no configuration loaded", T);
        rows = st.cfg.rows[T];
        colsb = st.cfg.colsb[T];
        if (!rows || !colsb) fail("tile used but not configured", T);
    }
    template <int T> static void zero() {
        int rows, colsb;
        shape(T, rows, colsb);
        std::memset(s().t[T], 0, sizeof s().t[T]);
    }
    template <int T> static void load(const void* p, int64_t stride) {
        int rows, colsb;
        shape(T, rows, colsb);
        std::memset(s().t[T], 0, sizeof s().t[T]);
        for (int r = 0; r < rows; ++r) std::memcpy(s().t[T][r], (const char*)p + r * stride, (size_t)colsb);
    }
    template <int T> static void store(void* p, int64_t stride) {
        int rows, colsb;
        shape(T, rows, colsb);
        for (int r = 0; r < rows; ++r) std::memcpy((char*)p + r * stride, s().t[T][r], (size_t)colsb);
    }
    // C [M][N] (4-byte elements), A [M][4 Kq], B [Kq][4 N]: the shapes both instructions require
    template <int C, int A, int B> static void shapes(int& M, int& N, int& Kq) {
        int cr, cc, ar, ac, br, bc;
        shape(C, cr, cc);
        shape(A, ar, ac);
        shape(B, br, bc);
        if (ar != cr || bc != cc || ac / 4 != br || ac % 4 || cc % 4) fail("tile shapes that do not multiply", C);
        M = cr;
        N = cc / 4;
        Kq = br;
    }
    template <int C, int A, int B> static void dp_su8() {
        int M, N, Kq;
        shapes<C, A, B>(M, N, Kq);
        State& st = s();
        for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
                int32_t acc;
                std::memcpy(&acc, &st.t[C][m][4 * n], 4);
                for (int k = 0; k < Kq; ++k)
                    for (int i = 0; i < 4; ++i)
                        acc += (int32_t)(int8_t)st.t[A][m][4 * k + i] * (int32_t)st.t[B][k][4 * n + i];
                std::memcpy(&st.t[C][m][4 * n], &acc, 4);
            }
    }
    static float bf16_daz(const uint8_t* p) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        if ((h & 0x7f80) == 0) h &= 0x8000;
        return bf16_to_f32(h);
    }
    template <int C, int A, int B> static void dp_bf16() {
        int M, N, Kp;
        shapes<C, A, B>(M, N, Kp);
        State& st = s();
        for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
                float acc;
                std::memcpy(&acc, &st.t[C][m][4 * n], 4);
                for (int k = 0; k < Kp; ++k)
                    for (int e = 0; e < 2; ++e) {
                        acc += bf16_daz(&st.t[A][m][4 * k + 2 * e]) * bf16_daz(&st.t[B][k][4 * n + 2 * e]);
                        if (std::fabs(acc) < 1.17549435e-38f) acc = std::copysign(0.f, acc);
                    }
                std::memcpy(&st.t[C][m][4 * n], &acc, 4);
            }
    }
    static int& loaded() {
        static thread_local int key = 0;
        return key;
    }
};

// the software tile unit instead of the instructions: set_amx_emulation, or PORTINFER_CPU_AMX=emulate
static bool emulate_from_env() {
    const char* env = std::getenv("PORTINFER_CPU_AMX");
    return env && !std::strcmp(env, "emulate");
}
std::atomic<bool> emulate{emulate_from_env()};

// ============================================================================
// bf16 GEMM

static const int64_t KC = 512;       // k per block: [256 pairs][32 outputs] bf16 = 32 KiB of B, in L1
static const int64_t MC_MAX = 1024;  // rows per task at most (a 1024 x 32 fp32 accumulator: 128 KiB, L2)

// every tile 16 rows x 64 bytes: C 0-3 (fp32), A 4-5 (32 bf16 of k), B 6-7 (16 k-pairs x 16 columns)
static const TileConfig bf16_config =
    tile_config({{16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}});

struct Bf16Job {
    const uint16_t* A;  // x in whole tiles: [Mp][lda], zero past row M and column K
    int64_t lda;
    const uint16_t* P;  // pack_dense's bf16 panels [ceil(N/32)][K][32]
    const uint16_t* bias;
    uint16_t* y;        // [M][N]
    int64_t M, Mp, N, K, mc, mchunks;
};

// task t: panel t / mchunks, rows of chunk t % mchunks; acc [mc][32] fp32 and B [KC/2][64] bf16 its
// own buffers
template <class U>
static void bf16_task(const Bf16Job& j, int64_t t, float* acc, uint16_t* B) {
    const int64_t p = t / j.mchunks, m0 = (t % j.mchunks) * j.mc, m1 = imin(j.Mp, m0 + j.mc);
    U::configure(&bf16_config);
    U::loaded() = 0;  // not an int8 configuration (int8_configure reloads its own)
    const int64_t sa = j.lda * 2;  // bytes between rows of A
    for (int64_t k0 = 0; k0 < j.K; k0 += KC) {
        const int64_t kc = imin(KC, j.K - k0), kp = ceil_div(kc, 2), kps = ceil_div(kc, 32) * 16;
        bf16_pack_pairs(B, j.P + (p * j.K + k0) * PANEL, kc);
        std::memset(B + kp * 64, 0, (size_t)(kps - kp) * 128);  // k-pairs past K: zeros (A's are zeros too)
        for (int64_t m = m0; m < m1; m += 32) {
            float* c = acc + (m - m0) * PANEL;
            const bool two = m + 16 < m1;  // 32 rows, or the chunk's last 16
            if (k0 == 0) {
                U::template zero<0>();
                U::template zero<1>();
                if (two) {
                    U::template zero<2>();
                    U::template zero<3>();
                }
            } else {
                U::template load<0>(c, PANEL * 4);
                U::template load<1>(c + 16, PANEL * 4);
                if (two) {
                    U::template load<2>(c + 16 * PANEL, PANEL * 4);
                    U::template load<3>(c + 16 * PANEL + 16, PANEL * 4);
                }
            }
            const uint16_t* a = j.A + m * j.lda + k0;
            for (int64_t q = 0; q < kps; q += 16) {  // 16 k-pairs: 32 k
                U::template load<6>(B + q * 64, 128);
                U::template load<7>(B + q * 64 + 32, 128);
                U::template load<4>(a + 2 * q, sa);
                U::template dp_bf16<0, 4, 6>();
                U::template dp_bf16<1, 4, 7>();
                if (two) {
                    U::template load<5>(a + 16 * j.lda + 2 * q, sa);
                    U::template dp_bf16<2, 5, 6>();
                    U::template dp_bf16<3, 5, 7>();
                }
            }
            U::template store<0>(c, PANEL * 4);
            U::template store<1>(c + 16, PANEL * 4);
            if (two) {
                U::template store<2>(c + 16 * PANEL, PANEL * 4);
                U::template store<3>(c + 16 * PANEL + 16, PANEL * 4);
            }
        }
    }
    U::release();
    if (m0 < j.M) bf16_store_rows(j.y + m0 * j.N, acc, j.bias, imin(m1, j.M) - m0, j.N, p * PANEL);
}

// x [M, K] (row stride xs) copied into A [Mp][lda] (a buffer of at least Mp * lda), zero-filled to whole tiles
static void bf16_tiles_of_x(uint16_t* A, int64_t lda, const uint16_t* x, int64_t xs, int64_t M, int64_t Mp, int64_t K) {
    for (int64_t m = 0; m < Mp; ++m) {
        uint16_t* row = A + m * lda;
        if (m < M) std::memcpy(row, x + m * xs, (size_t)K * 2);
        std::memset(row + (m < M ? K : 0), 0, (size_t)(lda - (m < M ? K : 0)) * 2);
    }
}

// rows a task takes: whole pairs of tiles, at most MC_MAX, fewer when there are too few panels for the threads
static int64_t bf16_chunk_rows(int64_t Mp, int64_t panels, int64_t threads) {
    int64_t mc = imin(Mp, MC_MAX);
    if (panels < 2 * threads) mc = imin(mc, imax(32, ceil_div(ceil_div(Mp, ceil_div(2 * threads, panels)), 32) * 32));
    return mc;
}

static int64_t bf16_lda(int64_t K) { return ceil_div(K, 32) * 32 + 32; }  // +64 bytes: rows off 4 KiB strides

template <class U>
static void gemm(void* out, const uint16_t* x, int64_t xs, const uint16_t* P, const uint16_t* bias, int64_t M, int64_t N,
                 int64_t K) {
    Bf16Job j;
    j.Mp = ceil_div(M, 16) * 16;
    j.lda = bf16_lda(K);
    uint16_t* A = (uint16_t*)scratch(0, 1, (size_t)(j.Mp * j.lda) / 2 + 16);
    bf16_tiles_of_x(A, j.lda, x, xs, M, j.Mp, K);
    j.A = A;
    j.P = P;
    j.bias = bias;
    j.y = (uint16_t*)out;
    j.M = M;
    j.N = N;
    j.K = K;
    const int64_t panels = ceil_div(N, PANEL);
    j.mc = bf16_chunk_rows(j.Mp, panels, pool_threads());
    j.mchunks = ceil_div(j.Mp, j.mc);
    auto task = [&](int64_t t, int thread) {
        float* acc = scratch(thread, 3, (size_t)(j.mc * PANEL));
        uint16_t* B = (uint16_t*)scratch(thread, 2, (size_t)(KC * PANEL / 2));
        bf16_task<U>(j, t, acc, B);
    };
    parallel_for(panels * j.mchunks, [](void* ctx, int64_t t, int thread) { (*(decltype(task)*)ctx)(t, thread); },
                 &task);
}

static void linear(void* out, const void* x, const void* weights, const void* bias, int64_t M, int64_t N, int64_t K,
                   int64_t xs, int adt, int wfmt) {
    if (bf16_gemm_takes(M, K, adt, wfmt)) {
        const uint16_t *xx = (const uint16_t*)x, *w = (const uint16_t*)weights, *b = (const uint16_t*)bias;
        if (emulate.load(std::memory_order_relaxed)) gemm<EmuTiles>(out, xx, xs, w, b, M, N, K);
        else gemm<HwTiles>(out, xx, xs, w, b, M, N, K);
        return;
    }
    table_avx512bf16()->linear(out, x, weights, bias, M, N, K, xs, adt, wfmt);
}

static KernelTable make_table() {
    KernelTable t = *table_avx512bf16();
    t.name = "amx";
    t.linear = linear;
    return t;
}

// ============================================================================
// int8 panels

// Fewer rows of x: the AVX512-VNNI kernel. A decode step of up to 15 sequences stays on it, a prefill
// (or a step of 16) takes tiles. Not tuned on hardware: per 32-weight block a tile round is tilezero,
// two tileloads, one TDPBSUD, a tilestored and the epilogue reading the sums back, a serial chain,
// where the vector kernel's 8 vpdpbusd a row of x overlap freely; only 16 rows a round surely pay.
static const int AMX_MIN_ROWS = 16;

// R rows of x: C 0 [R][16] int32, A 1 [R][32 bytes], B 2 [8 quads][16 columns]; for Q6_K's halves
// C 3, 4, A 5, 6 [R][16 bytes], B 7 [4 quads][16 columns]. The key: 16 + R.
static TileConfig int8_config(int R) {
    return tile_config({{R, 64}, {R, 32}, {8, 64}, {R, 64}, {R, 64}, {R, 16}, {R, 16}, {4, 64}});
}

template <class U>
static void int8_configure(int R) {
    if (U::loaded() == 16 + R) return;
    static const TileConfig configs[17] = {int8_config(1),  int8_config(1),  int8_config(2),  int8_config(3),
                                           int8_config(4),  int8_config(5),  int8_config(6),  int8_config(7),
                                           int8_config(8),  int8_config(9),  int8_config(10), int8_config(11),
                                           int8_config(12), int8_config(13), int8_config(14), int8_config(15),
                                           int8_config(16)};
    U::configure(&configs[R]);
    U::loaded() = 16 + R;
}

// y [R][16] = R (<= 16) rows of x against the panel at p (Int8Kernels::panel)
template <class U, int FMT>
static void panel_tiles(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                        const uint8_t* p) {
    using pi_amx_vnni::Vw;
    int8_configure<U>(R);
    const int64_t nb = K / QK;
    constexpr bool KQ = int8_has_header(FMT);
    constexpr int64_t REC = int8_record_bytes(FMT), QB = int8_quant_bytes(FMT);
    constexpr int64_t SPAN = int8_span(FMT), HDR = int8_header_bytes(FMT);
    alignas(64) float acc[16][16];
    alignas(64) int32_t c0[16][16], c1[16][16];
    alignas(64) uint8_t bt[512];
    for (int r = 0; r < R; ++r) Vw::store(acc[r], Vw::zero());
    for (int64_t j = 0; j < nb / SPAN; ++j) {
        const uint8_t* sb = p + j * (HDR + SPAN * REC);
        Vw::F dsb = Vw::zero(), nmin = Vw::zero();
        if constexpr (KQ) {
            dsb = Vw::half(sb);
            nmin = Vw::sub(Vw::zero(), Vw::half(sb + 32));
        }
        for (int64_t bb = 0; bb < SPAN; ++bb) {
            const int64_t b = j * SPAN + bb;
            const uint8_t* rec = sb + HDR + bb * REC;
            for (int64_t l = 0; l < REC; l += 64) __builtin_prefetch(rec + pi_amx_vnni::PREFETCH_AHEAD + l);
            Vw::F scale, scale1 = Vw::zero(), offw = Vw::zero();
            if constexpr (KQ) {
                scale = Vw::mul(dsb, Vw::u8(rec + QB));
                offw = Vw::mul(nmin, Vw::u8(rec + QB + 16));
            } else if constexpr (FMT == Q6_K) {
                const Vw::F d = Vw::half(rec + QB);
                scale = Vw::mul(d, Vw::i8(rec + QB + 32));
                scale1 = Vw::mul(d, Vw::i8(rec + QB + 48));
            } else {
                scale = Vw::half(rec + QB);
                if constexpr (FMT == Q4_1) offw = Vw::half(rec + QB + 32);
            }
            if constexpr (FMT != Q8_0) {  // the unsigned codes, decoded: B's 8 rows of quads
                Vw::I t[8];
                pi_amx_vnni::codes<FMT>(t, rec);
                for (int i = 0; i < 8; ++i) _mm512_store_si512(bt + 64 * i, t[i]);
            }
            const int8_t* xb = q + b * QK;
            if constexpr (FMT == Q6_K) {
                U::template zero<3>();
                U::template zero<4>();
                U::template load<5>(xb, K);
                U::template load<6>(xb + 16, K);
                U::template load<7>(bt, 64);
                U::template dp_su8<3, 5, 7>();
                U::template load<7>(bt + 256, 64);
                U::template dp_su8<4, 6, 7>();
                U::template store<3>(c0, 64);
                U::template store<4>(c1, 64);
            } else {
                U::template zero<0>();
                U::template load<1>(xb, K);
                U::template load<2>(FMT == Q8_0 ? rec : bt, 64);
                U::template dp_su8<0, 1, 2>();
                U::template store<0>(c0, 64);
            }
            for (int r = 0; r < R; ++r) {  // as int8_impl.h's lanes_r: the same fp32 operations
                const int32_t* o = xo + (r * nb + b) * 4;
                const Vw::F dx = Vw::set1f(xd[r * nb + b]);
                Vw::F a = _mm512_load_ps(acc[r]);
                if constexpr (FMT == Q6_K) {
                    const Vw::I p0 = _mm512_add_epi32(_mm512_load_si512(c0[r]), Vw::set1(o[0]));
                    const Vw::I p1 = _mm512_add_epi32(_mm512_load_si512(c1[r]), Vw::set1(o[1]));
                    a = Vw::fmadd(Vw::cvt(p0), Vw::mul(scale, dx), a);
                    a = Vw::fmadd(Vw::cvt(p1), Vw::mul(scale1, dx), a);
                } else {
                    Vw::I p0 = _mm512_load_si512(c0[r]);
                    if constexpr (FMT == Q4_0) p0 = _mm512_add_epi32(p0, Vw::set1(o[2]));  // -8 sum(q)
                    if constexpr (FMT == Q8_0) p0 = _mm512_add_epi32(p0, Vw::set1(o[3]));  // -128 sum(q)
                    a = Vw::fmadd(Vw::cvt(p0), Vw::mul(scale, dx), a);
                    if constexpr (FMT == Q4_1 || KQ) a = Vw::fmadd(offw, Vw::set1f(xs[r * nb + b]), a);
                }
                Vw::store(acc[r], a);
            }
        }
    }
    for (int r = 0; r < R; ++r) Vw::store(y + 16 * r, _mm512_load_ps(acc[r]));
}

template <class U>
static void panel_unit(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                       const uint8_t* p, int fmt) {
    switch (fmt) {
        case Q8_0: panel_tiles<U, Q8_0>(y, q, xd, xs, xo, R, K, p); break;
        case Q4_0: panel_tiles<U, Q4_0>(y, q, xd, xs, xo, R, K, p); break;
        case Q4_1: panel_tiles<U, Q4_1>(y, q, xd, xs, xo, R, K, p); break;
        case Q4_K: panel_tiles<U, Q4_K>(y, q, xd, xs, xo, R, K, p); break;
        case Q5_K: panel_tiles<U, Q5_K>(y, q, xd, xs, xo, R, K, p); break;
        default: panel_tiles<U, Q6_K>(y, q, xd, xs, xo, R, K, p); break;
    }
}

static void panel(float* y, const int8_t* q, const float* xd, const float* xs, const int32_t* xo, int R, int64_t K,
                  const uint8_t* p, int fmt) {
    if (R < AMX_MIN_ROWS) {  // the VNNI kernel, at most pi_amx_vnni::PANEL_ROWS rows a call
        const int64_t nb = K / QK;
        for (int r0 = 0; r0 < R; r0 += pi_amx_vnni::PANEL_ROWS) {
            const int n = R - r0 < pi_amx_vnni::PANEL_ROWS ? R - r0 : pi_amx_vnni::PANEL_ROWS;
            pi_amx_vnni::panel(y + 16 * r0, q + r0 * K, xd + r0 * nb, xs + r0 * nb, xo + r0 * nb * 4, n, K, p, fmt);
        }
    } else if (emulate.load(std::memory_order_relaxed)) panel_unit<EmuTiles>(y, q, xd, xs, xo, R, K, p, fmt);
    else panel_unit<HwTiles>(y, q, xd, xs, xo, R, K, p, fmt);
}

static const Int8Kernels int8_kernels = {"amx", pi_amx_vnni::quantize_row, panel, 16};

// ============================================================================
// the self-check (amx.h): small problems whose answers the software tile unit computes in the parent,
// the hardware in a forked child (single-threaded, on buffers allocated before the fork)

struct SelfCheck {
    // int8: one panel of 16 rows, K = 256, 16 rows of x (the tile rounds the path runs), in each of three
    // formats that take the three B shapes (Q8_0 straight from the panel, Q4_0 decoded, Q6_K in halves)
    static const int R = 16;
    static const int64_t K8 = 256;
    std::vector<uint8_t> panels[3];
    std::vector<int8_t> q;
    std::vector<float> d, s;
    std::vector<int32_t> xo;
    std::vector<float> want8[3], got8[3];
    // bf16: 40 x 100 @ (40 x 100)^T: two panels, a chunk of 32 + 16 rows, k padded within a block
    static const int64_t M = 40, N = 40, K = 100;
    std::vector<uint16_t> x, packed, A, B, want16, got16;
    std::vector<float> acc;
    Bf16Job job;
};
static const int SC_FORMATS[3] = {Q8_0, Q4_0, Q6_K};
static SelfCheck* check = nullptr;

static uint32_t lcg(uint32_t& st) { return st = st * 1664525u + 1013904223u; }

template <class U>
static void selfcheck_int8(std::vector<float>* out) {
    SelfCheck& c = *check;
    for (int f = 0; f < 3; ++f)
        panel_unit<U>(out[f].data(), c.q.data(), c.d.data(), c.s.data(), c.xo.data(), SelfCheck::R, SelfCheck::K8,
                      c.panels[f].data(), SC_FORMATS[f]);
}

template <class U>
static void selfcheck_bf16(std::vector<uint16_t>& out) {
    SelfCheck& c = *check;
    c.job.y = out.data();
    for (int64_t t = 0; t < ceil_div(SelfCheck::N, PANEL) * c.job.mchunks; ++t) bf16_task<U>(c.job, t, c.acc.data(), c.B.data());
}

static void selfcheck_prepare() {
    if (check) return;
    check = new SelfCheck();
    SelfCheck& c = *check;
    uint32_t st = 12345;
    // int8: random GGUF blocks (scales of 1/64 .. 1), repacked; x random in [-1, 1]
    const int64_t K = SelfCheck::K8, nb = K / QK;
    for (int f = 0; f < 3; ++f) {
        const int fmt = SC_FORMATS[f], wfmt = int8_source_format(fmt);
        const int64_t row_bytes = fmt == Q6_K ? K / QK_K * kquant_block_bytes(wfmt) : nb * quant_block_bytes(fmt);
        std::vector<uint8_t> blocks((size_t)(16 * row_bytes));
        for (auto& v : blocks) v = (uint8_t)(lcg(st) >> 24);
        for (int n = 0; n < 16; ++n) {  // the fp16 scales: 2^-6 .. 2^0 (exponent 9..15), positive
            if (fmt == Q6_K) {
                const uint16_t h = (uint16_t)(((9 + lcg(st) % 7) << 10) | ((lcg(st) >> 8) & 0x3ff));
                std::memcpy(&blocks[(size_t)(n * row_bytes + 208)], &h, 2);
            } else {
                for (int64_t b = 0; b < nb; ++b) {
                    const uint16_t h = (uint16_t)(((9 + lcg(st) % 7) << 10) | ((lcg(st) >> 8) & 0x3ff));
                    std::memcpy(&blocks[(size_t)(n * row_bytes + b * quant_block_bytes(fmt))], &h, 2);
                }
            }
        }
        c.panels[f].assign((size_t)int8_panel_bytes(fmt, K), 0);
        int8_repack(c.panels[f].data(), blocks.data(), 16, K, fmt);
        c.want8[f].assign(16 * 16, 0.f);
        c.got8[f].assign(16 * 16, 0.f);
    }
    c.q.assign((size_t)(SelfCheck::R * K), 0);
    c.d.assign((size_t)(SelfCheck::R * nb), 0.f);
    c.s.assign((size_t)(SelfCheck::R * nb), 0.f);
    c.xo.assign((size_t)(SelfCheck::R * nb * 4), 0);
    std::vector<float> row((size_t)K);
    for (int r = 0; r < SelfCheck::R; ++r) {
        for (auto& v : row) v = (float)((int32_t)lcg(st) >> 8) / 8388608.f;
        pi_amx_vnni::quantize_row(&c.q[(size_t)(r * K)], &c.d[(size_t)(r * nb)], &c.s[(size_t)(r * nb)], row.data(), K);
        int8_panel_offsets(&c.xo[(size_t)(r * nb * 4)], &c.q[(size_t)(r * K)], nb);
    }
    selfcheck_int8<EmuTiles>(c.want8);
    // bf16
    const int64_t M = SelfCheck::M, N = SelfCheck::N, K16 = SelfCheck::K;
    c.x.resize((size_t)(M * K16));
    std::vector<uint16_t> w((size_t)(N * K16));
    for (auto& v : c.x) v = f32_to_bf16((float)((int32_t)lcg(st) >> 8) / 8388608.f);
    for (auto& v : w) v = f32_to_bf16((float)((int32_t)lcg(st) >> 8) / 8388608.f);
    c.packed.assign((size_t)(ceil_div(N, PANEL) * K16 * PANEL), 0);
    pack_dense(c.packed.data(), w.data(), N, K16, K16, 2);
    Bf16Job& j = c.job;
    j.Mp = ceil_div(M, 16) * 16;
    j.lda = bf16_lda(K16);
    c.A.assign((size_t)(j.Mp * j.lda), 0);
    bf16_tiles_of_x(c.A.data(), j.lda, c.x.data(), K16, M, j.Mp, K16);
    j.A = c.A.data();
    j.P = c.packed.data();
    j.bias = nullptr;
    j.M = M;
    j.N = N;
    j.K = K16;
    j.mc = j.Mp;
    j.mchunks = 1;
    c.acc.assign((size_t)(j.mc * PANEL), 0.f);
    c.B.assign((size_t)(KC * PANEL / 2), 0);
    c.want16.assign((size_t)(M * N), 0);
    c.got16.assign((size_t)(M * N), 0);
    selfcheck_bf16<EmuTiles>(c.want16);
}

// 0: agree; 1: the int8 sums differ (they must match bit for bit); 2: bf16 beyond rounding
static int selfcheck_compare() {
    SelfCheck& c = *check;
    for (int f = 0; f < 3; ++f)
        if (std::memcmp(c.want8[f].data(), c.got8[f].data(), c.want8[f].size() * 4)) return 1;
    double num = 0, den = 0;
    for (size_t i = 0; i < c.want16.size(); ++i) {
        const double a = bf16_to_f32(c.want16[i]), b = bf16_to_f32(c.got16[i]);
        num += (a - b) * (a - b);
        den += a * a;
    }
    return num <= 1e-5 * den ? 0 : 2;  // relative L2 <= 3.2e-3: within one bf16 rounding of the sums
}

}  // namespace pi_amx

#pragma GCC pop_options

void amx_set_emulation(bool on) { pi_amx::emulate.store(on); }
bool amx_emulation() { return pi_amx::emulate.load(); }

const KernelTable* table_amx() {
    static const KernelTable table = pi_amx::make_table();
    return &table;
}

const Int8Kernels* int8_kernels_amx() { return &pi_amx::int8_kernels; }

void amx_selfcheck_prepare() { pi_amx::selfcheck_prepare(); }

// hardware: the tile instructions (in the forked child); else the other paths' kernels -- the
// AVX512-VNNI panel (bit for bit) and the avx512bf16 GEMM -- against the same expected answers
int amx_selfcheck_run(bool hardware) {
    using namespace pi_amx;
    selfcheck_prepare();
    SelfCheck& c = *check;
    if (hardware) {
        selfcheck_int8<HwTiles>(c.got8);
        selfcheck_bf16<HwTiles>(c.got16);
    } else {
        for (int f = 0; f < 3; ++f)
            for (int r0 = 0; r0 < SelfCheck::R; r0 += 8) {  // the VNNI kernel takes 8 rows a call
                const int rows = (int)imin(8, SelfCheck::R - r0);
                const int64_t nb = SelfCheck::K8 / QK;
                pi_amx_vnni::panel(c.got8[f].data() + 16 * r0, c.q.data() + r0 * SelfCheck::K8, c.d.data() + r0 * nb,
                                   c.s.data() + r0 * nb, c.xo.data() + r0 * nb * 4, rows, SelfCheck::K8,
                                   c.panels[f].data(), SC_FORMATS[f]);
            }
        table_avx512bf16()->linear(c.got16.data(), c.x.data(), c.packed.data(), nullptr, SelfCheck::M, SelfCheck::N,
                                   SelfCheck::K, SelfCheck::K, DT_BF16, W_BF16);
    }
    return selfcheck_compare();
}
#endif
