// The int8 route's repacking and driver (int8.h): quantize x once per call, then run the chosen
// path's dot products over groups of 4 output rows on the pool. Plain C++ (no ISA extension):
// all vector work happens in the path's kernels.
#include "int8.h"

static inline int64_t i8_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t i8_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t i8_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t int8_group_bytes(int fmt, int64_t K) {
    return i8_ceil_div(int8_record_offset(fmt, K / QK) - int8_header_bytes(fmt), 64) * 64;
}

// Q6_K super-blocks [N][K/256] into records (int8.h): the codes u (6 bits: kquant_codes), d and the
// int8 scales as stored. GGUF's Q6_K (210 bytes): ql[128], qh[64], scales[16], fp16 d;
// w = d scales[j / 16] (u - 32)
static void int8_repack_q6_k(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K) {
    const int64_t nsb = K / QK_K, sbb = kquant_block_bytes(W_Q6_K), gb = int8_group_bytes(Q6_K, K);
    const int64_t qb = int8_quant_bytes(Q6_K);
    for (int64_t n = 0; n < N; ++n) {
        uint8_t* g = out + (n / I8_ROWS) * gb;
        const int i = (int)(n % I8_ROWS);
        for (int64_t j = 0; j < nsb; ++j) {
            const uint8_t* sb = blocks + (n * nsb + j) * sbb;
            const uint8_t *sc = sb + 192, *d = sb + 208;
            uint8_t u[QK_K];
            kquant_codes(u, sb, W_Q6_K);
            for (int b = 0; b < QK_K / QK; ++b) {
                uint8_t* r = g + int8_record_offset(Q6_K, j * (QK_K / QK) + b);
                const uint8_t* ub = u + b * QK;
                for (int t = 0; t < 16; ++t) {
                    r[16 * i + t] = (uint8_t)((ub[t] & 15) | ((ub[t + 16] & 15) << 4));
                    r[64 + (i % 2) * 16 + t] |= (uint8_t)(((ub[t] >> 4) << int8_q6_qh_shift(i, t)) |
                                                          ((ub[t + 16] >> 4) << int8_q6_qh_shift(i, t + 16)));
                }
                std::memcpy(r + qb + 2 * i, d, 2);
                r[qb + 8 + int8_q6_sc_index(i, 0)] = sc[2 * b];
                r[qb + 8 + int8_q6_sc_index(i, 1)] = sc[2 * b + 1];
            }
        }
    }
}

// Q4_K / Q5_K super-blocks [N][K/256] into headers and records (int8.h): codes (kquant_codes), scales
// and mins as stored. GGUF's Q4_K (144 bytes): fp16 d, fp16 dmin, scales[12] (8 x 6-bit sc, 8 x 6-bit
// m), qs[128]; Q5_K (176) has qh[32] before qs; w = d sc u - dmin m
static void int8_repack_k(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt) {
    const int wfmt = int8_source_format(fmt);
    const int64_t nsb = K / QK_K, sbb = kquant_block_bytes(wfmt), gb = int8_group_bytes(fmt, K);
    const int64_t qb = int8_quant_bytes(fmt);
    for (int64_t n = 0; n < N; ++n) {
        uint8_t* g = out + (n / I8_ROWS) * gb;
        const int i = (int)(n % I8_ROWS);
        for (int64_t j = 0; j < nsb; ++j) {
            const uint8_t* sb = blocks + (n * nsb + j) * sbb;
            uint8_t codes[QK_K];
            kquant_codes(codes, sb, wfmt);
            uint8_t* hdr = g + int8_record_offset(fmt, j * (QK_K / QK)) - int8_header_bytes(fmt);
            std::memcpy(hdr + 2 * i, sb, 2);      // d
            std::memcpy(hdr + 8 + 2 * i, sb + 2, 2);  // dmin
            for (int sub = 0; sub < QK_K / QK; ++sub) {
                uint8_t* r = g + int8_record_offset(fmt, j * (QK_K / QK) + sub);
                const uint8_t* u = codes + sub * QK;
                for (int t = 0; t < 16; ++t) {
                    r[16 * i + t] = (uint8_t)((u[t] & 15) | ((u[t + 16] & 15) << 4));
                    if (fmt == Q5_K)
                        r[64 + t] |= (uint8_t)(((u[t] >> 4) << int8_q5_qh_bit(i, t)) |
                                               ((u[t + 16] >> 4) << int8_q5_qh_bit(i, t + 16)));
                }
                int sc, m;
                kquant_scale_min(sb + 4, sub, &sc, &m);
                r[qb + i] = (uint8_t)sc;
                r[qb + 4 + i] = (uint8_t)m;
            }
        }
    }
}

void int8_repack(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt) {
    const int64_t gb = int8_group_bytes(fmt, K), groups = i8_ceil_div(N, I8_ROWS);
    std::memset(out, 0, (size_t)(groups * gb));
    if (fmt == Q6_K) {
        int8_repack_q6_k(out, blocks, N, K);
        return;
    }
    if (int8_has_header(fmt)) {
        int8_repack_k(out, blocks, N, K, fmt);
        return;
    }
    const int64_t nb = K / QK, bb = quant_block_bytes(fmt), row_bytes = nb * bb, qb = int8_quant_bytes(fmt);
    const int64_t rec = int8_record_bytes(fmt);
    const int64_t rq = qb / I8_ROWS;  // quant bytes of one row's block: 32 (Q8_0) or 16
    for (int64_t n = 0; n < N; ++n) {
        uint8_t* g = out + (n / I8_ROWS) * gb;
        const int64_t i = n % I8_ROWS;
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = blocks + n * row_bytes + b * bb;
            uint8_t* r = g + b * rec;
            const int64_t head = fmt == Q4_1 ? 4 : 2;  // d (and m) come first in a GGUF block
            std::memcpy(r + i * rq, blk + head, (size_t)rq);
            std::memcpy(r + qb + i * 2, blk, 2);
            if (fmt == Q4_1) std::memcpy(r + qb + 8 + i * 2, blk + 2, 2);
        }
    }
}

// weight row n of the repacked W, dequantized into w [K] (for rows of x with NaN / Inf, which
// take fp32 arithmetic so that they propagate as the op contract says)
static void dequant_row(float* w, const uint8_t* packed, int64_t n, int64_t K, int fmt) {
    const uint8_t* g = packed + (n / I8_ROWS) * int8_group_bytes(fmt, K);
    for (int64_t b = 0; b < K / QK; ++b) int8_dequant_block(w + b * QK, g, b, (int)(n % I8_ROWS), fmt);
}

struct Int8Call {
    const Int8Kernels* k;
    void* out;
    const void* x;
    const uint8_t* packed;
    const void* bias;
    int64_t M, N, K, xs, nb, gb, groups_per_task;
    int adt, fmt;
    bool use_panel;   // the path's panel kernel (M >= I8_PANEL_MIN_M)
    int8_t* q;        // [M][K]
    float *d, *s;     // [M][nb]
    int32_t* xo;      // [M][nb][8] (Q6_K, int8_offsets) or, on panels, [M][nb][4] (int8_panel_offsets); else null
    uint8_t* finite;  // [M]: 0 where the row holds a NaN / Inf
};

// S0, S1: the sums of block b of a quantized row q over weights 0..15 and 16..31
static inline void half_sums(const int8_t* q, int64_t b, int& s0, int& s1) {
    s0 = s1 = 0;
    for (int t = 0; t < 16; ++t) {
        s0 += q[b * QK + t];
        s1 += q[b * QK + 16 + t];
    }
}

// The integer offsets of one quantized row q [nb * 32]: per block the vector 32 [S0 S0 S1 S1 S0 S0 S1 S1]
// (half_sums), in the lane order of the Q6_K kernels' sums, which subtract it once per block and row of
// x instead of per weight vector (w = d sc (u - 32))
static void int8_offsets(int32_t* xo, const int8_t* q, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        int s0, s1;
        half_sums(q, b, s0, s1);
        const int32_t v[8] = {32 * s0, 32 * s0, 32 * s1, 32 * s1, 32 * s0, 32 * s0, 32 * s1, 32 * s1};
        std::memcpy(xo + b * 8, v, sizeof v);
    }
}

// The panel kernels' integer offsets of one quantized row: per block [-32 S0, -32 S1, -8 S, -128 S]
// (half_sums, S = S0 + S1), where Q6_K's halves, Q4_0's and Q8_0's sums start (their codes are
// unsigned: u - 32, n - 8, w + 128)
static void int8_panel_offsets(int32_t* xo, const int8_t* q, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        int s0, s1;
        half_sums(q, b, s0, s1);
        const int32_t v[4] = {-32 * s0, -32 * s1, -8 * (s0 + s1), -128 * (s0 + s1)};
        std::memcpy(xo + b * 4, v, sizeof v);
    }
}

// rows m of x: to fp32, quantized (tasks of rows)
static void quantize_task(void* ctx, int64_t m, int thread) {
    Int8Call& c = *(Int8Call*)ctx;
    const float* row;
    if (c.adt == DT_F32) {
        row = (const float*)c.x + m * c.xs;
    } else {
        float* buf = scratch(thread, 6, (size_t)c.K);
        for (int64_t k = 0; k < c.K; ++k) buf[k] = load_scalar(c.x, c.adt, m * c.xs + k);
        row = buf;
    }
    c.finite[m] = c.k->quantize_row(c.q + m * c.K, c.d + m * c.nb, c.s + m * c.nb, row, c.K) ? 1 : 0;
    if (c.use_panel) int8_panel_offsets(c.xo + m * c.nb * 4, c.q + m * c.K, c.nb);
    else if (c.xo) int8_offsets(c.xo + m * c.nb * 8, c.q + m * c.K, c.nb);
}

// y [R][ys] (the sums of rows m0.. of x against output rows n0 .. n0 + nn) into out, the bias added. The
// common case (fp32 out, every row finite) stores straight into out; other rows go through the
// general path (rows with NaN / Inf take an fp32 dot product, so that they propagate as the
// reference's do).
static void store_sums(const Int8Call& c, const float* y, int64_t ys, int64_t m0, int R, int64_t n0, int nn,
                       int thread, float*& wrow) {
    const int64_t N = c.N, K = c.K;
    bool fast = c.adt == DT_F32;
    for (int r = 0; r < R; ++r) fast = fast && c.finite[m0 + r];
    if (fast) {
        const float* bias32 = (const float*)c.bias;
        for (int r = 0; r < R; ++r) {
            float* o = (float*)c.out + (m0 + r) * N + n0;
            for (int i = 0; i < nn; ++i) o[i] = y[r * ys + i] + (bias32 ? bias32[n0 + i] : 0.f);
        }
        return;
    }
    for (int r = 0; r < R; ++r) {
        const int64_t m = m0 + r;
        for (int i = 0; i < nn; ++i) {
            const int64_t n = n0 + i;
            float v = y[r * ys + i];
            if (!c.finite[m]) {
                if (!wrow) wrow = scratch(thread, 7, (size_t)K);
                dequant_row(wrow, c.packed, n, K, c.fmt);
                v = 0.f;
                for (int64_t k = 0; k < K; ++k) v += load_scalar(c.x, c.adt, m * c.xs + k) * wrow[k];
            }
            if (c.bias) v += load_scalar(c.bias, c.adt, n);
            store_scalar(c.out, c.adt, m * N + n, v);
        }
    }
}

// a run of groups against every row of x. With the path's panel kernel (and M >= 2): panels of 4 (2)
// groups, each against the rows of x in chunks of up to 8 (4) (equal sizes), the panel's weights in
// L1 across the chunks. Otherwise 4 rows of x at a time against each group (the run's weights stay
// in cache between row chunks when M > 4).
static void groups_task(void* ctx, int64_t t, int thread) {
    const Int8Call& c = *(const Int8Call*)ctx;
    const int64_t N = c.N, K = c.K, nb = c.nb, M = c.M;
    const int64_t groups = i8_ceil_div(N, I8_ROWS);
    const int64_t g0 = t * c.groups_per_task, g1 = i8_min(groups, g0 + c.groups_per_task);
    float* wrow = nullptr;
    if (c.use_panel) {
        const int PG = c.k->panel_groups, PR = c.k->panel_rows;
        const int64_t chunks = i8_ceil_div(M, PR);
        // more than one chunk: the first transcodes each block of the panel into a per-thread cache, the
        // others read it back (the transcoding is ~40% of a chunk's instructions at 8 rows)
        uint8_t* tc = chunks > 1 ? (uint8_t*)scratch(thread, 0, (size_t)(nb * I8_PANEL_CACHE_BYTES / 4)) : nullptr;
        for (int64_t g = g0; g < g1; g += PG) {
            const int ng = (int)i8_min(PG, g1 - g);
            for (int64_t ch = 0; ch < chunks; ++ch) {
                const int64_t m0 = ch * M / chunks;
                const int R = (int)((ch + 1) * M / chunks - m0);
                alignas(64) float y[I8_PANEL_ROWS * 16];
                c.k->panel(y, c.q + m0 * K, c.d + m0 * nb, c.s + m0 * nb, c.xo + m0 * nb * 4, R, K,
                           c.packed + g * c.gb, c.gb, ng, tc, ch == 0, c.fmt);
                store_sums(c, y, 16, m0, R, g * I8_ROWS, (int)i8_min(PG * I8_ROWS, N - g * I8_ROWS), thread, wrow);
            }
        }
        return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += I8_ROWS) {
        const int R = (int)i8_min(I8_ROWS, M - m0);
        for (int64_t g = g0; g < g1; ++g) {
            alignas(64) float y[I8_ROWS * I8_ROWS];
            c.k->dot_group(y, c.q + m0 * K, c.d + m0 * nb, c.s + m0 * nb, c.xo ? c.xo + m0 * nb * 8 : nullptr, R, K,
                           c.packed + g * c.gb, c.fmt);
            store_sums(c, y, I8_ROWS, m0, R, g * I8_ROWS, (int)i8_min(I8_ROWS, N - g * I8_ROWS), thread, wrow);
        }
    }
}

void linear_int8(const Int8Kernels* k, void* out, const void* x, const uint8_t* packed, const void* bias, int64_t M,
                 int64_t N, int64_t K, int64_t xs, int adt, int fmt) {
    Int8Call c;
    c.k = k; c.out = out; c.x = x; c.packed = packed; c.bias = bias;
    c.M = M; c.N = N; c.K = K; c.xs = xs; c.adt = adt; c.fmt = fmt;
    c.nb = K / QK;
    c.gb = int8_group_bytes(fmt, K);
    // scratch (thread 0, slots 4 and 5), taken before any task runs: q [M][K] int8, d, s [M][nb],
    // xo (Q6_K or panels: Int8Call), finite [M]
    c.use_panel = k->panel && (k->panel_formats >> fmt & 1) && M >= I8_PANEL_MIN_M;
    const int64_t xo_n = c.use_panel ? 4 * M * c.nb : fmt == Q6_K ? 8 * M * c.nb : 0;
    c.q = (int8_t*)scratch(0, 4, (size_t)i8_ceil_div(M * K, 4));
    float* ds = scratch(0, 5, (size_t)(2 * M * c.nb + xo_n + i8_ceil_div(M, 4)));
    c.d = ds;
    c.s = ds + M * c.nb;
    c.xo = xo_n ? (int32_t*)(ds + 2 * M * c.nb) : nullptr;
    c.finite = (uint8_t*)(ds + 2 * M * c.nb + xo_n);
    if (M * K >= 16384) parallel_for(M, quantize_task, &c);
    else for (int64_t m = 0; m < M; ++m) quantize_task(&c, m, 0);

    const int64_t groups = i8_ceil_div(N, I8_ROWS), threads = pool_threads();
    if (M <= I8_ROWS) {
        // decode: long contiguous runs, 2 per thread (a thread streams one region and the hardware
        // prefetcher keeps up; with 8 per thread every matrix of SmolLM2 or a Qwen2-0.5B restarted its
        // streams 8 times: 1.06x / 1.19x tok/s for 2 over 8, alternated in one process on a Zen 5),
        // the second half left for whichever thread is free first
        c.groups_per_task = i8_max(4, i8_ceil_div(groups, 2 * threads));
    } else {
        // prefill: runs of ~32 KiB of weights (kept in L1/L2 across the chunks of 4 rows of x),
        // but enough runs for every thread
        c.groups_per_task = i8_max(1, i8_min(32768 / c.gb, i8_ceil_div(groups, 2 * threads)));
    }
    if (c.use_panel)  // whole panels per task
        c.groups_per_task = i8_ceil_div(c.groups_per_task, k->panel_groups) * k->panel_groups;
    parallel_for(i8_ceil_div(groups, c.groups_per_task), groups_task, &c);
}
