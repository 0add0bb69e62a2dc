// The int8 route's repacking and driver (int8.h): quantize x once per call, then run the chosen
// path's dot products over panels of 16 output rows on the pool. Plain C++ (no ISA extension):
// all vector work happens in the path's kernels.
#include "int8.h"

static inline int64_t i8_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t i8_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t i8_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t int8_panel_bytes(int fmt, int64_t K) {
    return i8_ceil_div(int8_record_offset(fmt, K / QK) - int8_header_bytes(fmt), 64) * 64;
}

// the codes of row r of one record: u [32] unsigned (Q8_0: w + 128), placed as int8.h says
template <int FMT>
static inline void put_codes(uint8_t* rec, int r, const uint8_t* u) {
    for (int t = 0; t < QK; ++t) {
        uint8_t& c = rec[int8_code_at(FMT, r, t)];
        if (FMT == Q8_0) c = u[t];
        else c |= (uint8_t)((u[t] & 15) << (t < 16 ? 0 : 4));
        if (FMT == Q5_K) rec[256 + 4 * r + t % 4] |= (uint8_t)(((u[t] >> 4) & 1) << (t / 4));
        if (FMT == Q6_K) rec[256 + 64 * (t / 16) + 4 * r + t % 4] |= (uint8_t)(((u[t] >> 4) & 3) << (2 * ((t % 16) / 4)));
    }
}

// GGUF blocks [N][K/32] (Q8_0, Q4_0, Q4_1) or super-blocks [N][K/256] (the K-quants) of one row n,
// into its panel's records (int8.h): codes (kquant_codes for the K-quants), scales and mins as stored.
// GGUF's Q6_K (210 bytes): ql[128], qh[64], scales[16], fp16 d, w = d scales[j / 16] (u - 32); Q4_K
// (144): fp16 d, fp16 dmin, scales[12] (8 x 6-bit sc, 8 x 6-bit m), qs[128]; Q5_K (176): qh[32]
// before qs; w = d sc u - dmin m
template <int FMT>
static void repack_row(uint8_t* panel, int r, const uint8_t* row, int64_t K) {
    constexpr int fmt = FMT;
    const int64_t qb = int8_quant_bytes(fmt);
    if (fmt == Q6_K || int8_has_header(fmt)) {
        const int wfmt = int8_source_format(fmt);
        const int64_t sbb = kquant_block_bytes(wfmt);
        for (int64_t j = 0; j < K / QK_K; ++j) {
            const uint8_t* sb = row + j * sbb;
            uint8_t u[QK_K];
            kquant_codes(u, sb, wfmt);
            if (int8_has_header(fmt)) {
                uint8_t* hdr = panel + int8_record_offset(fmt, j * (QK_K / QK)) - int8_header_bytes(fmt);
                std::memcpy(hdr + 2 * r, sb, 2);           // d
                std::memcpy(hdr + 32 + 2 * r, sb + 2, 2);  // dmin
            }
            for (int sub = 0; sub < QK_K / QK; ++sub) {
                uint8_t* rec = panel + int8_record_offset(fmt, j * (QK_K / QK) + sub);
                put_codes<FMT>(rec, r, u + sub * QK);
                if (fmt == Q6_K) {
                    std::memcpy(rec + qb + 2 * r, sb + 208, 2);
                    rec[qb + 32 + r] = sb[192 + 2 * sub];
                    rec[qb + 48 + r] = sb[192 + 2 * sub + 1];
                } else {
                    int sc, m;
                    kquant_scale_min(sb + 4, sub, &sc, &m);
                    rec[qb + r] = (uint8_t)sc;
                    rec[qb + 16 + r] = (uint8_t)m;
                }
            }
        }
        return;
    }
    const int64_t bb = quant_block_bytes(fmt), head = fmt == Q4_1 ? 4 : 2;  // d (and m) come first
    for (int64_t b = 0; b < K / QK; ++b) {
        const uint8_t* blk = row + b * bb;
        uint8_t* rec = panel + int8_record_offset(fmt, b);
        uint8_t u[QK];
        for (int t = 0; t < QK; ++t)
            u[t] = fmt == Q8_0 ? (uint8_t)(blk[head + t] ^ 0x80) : (uint8_t)((blk[head + t % 16] >> (t < 16 ? 0 : 4)) & 15);
        put_codes<FMT>(rec, r, u);
        std::memcpy(rec + qb + 2 * r, blk, 2);
        if (fmt == Q4_1) std::memcpy(rec + qb + 32 + 2 * r, blk + 2, 2);
    }
}

struct RepackCall {
    uint8_t* out;
    const uint8_t* blocks;
    int64_t N, K, pb, row_bytes;
    int fmt;
};

// panel p: zeroed (rows past N stay zero), then each of its rows (tasks of panels)
static void repack_task(void* ctx, int64_t p, int) {
    const RepackCall& c = *(const RepackCall*)ctx;
    uint8_t* panel = c.out + p * c.pb;
    std::memset(panel, 0, (size_t)c.pb);
    for (int64_t n = p * I8_ROWS; n < i8_min(c.N, (p + 1) * I8_ROWS); ++n) {
        const uint8_t* row = c.blocks + n * c.row_bytes;
        const int r = (int)(n % I8_ROWS);
        switch (c.fmt) {
            case Q8_0: repack_row<Q8_0>(panel, r, row, c.K); break;
            case Q4_0: repack_row<Q4_0>(panel, r, row, c.K); break;
            case Q4_1: repack_row<Q4_1>(panel, r, row, c.K); break;
            case Q4_K: repack_row<Q4_K>(panel, r, row, c.K); break;
            case Q5_K: repack_row<Q5_K>(panel, r, row, c.K); break;
            default: repack_row<Q6_K>(panel, r, row, c.K); break;
        }
    }
}

void int8_repack(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt) {
    const int wfmt = int8_source_format(fmt);
    RepackCall c{out, blocks, N, K, int8_panel_bytes(fmt, K),
                 wfmt >= W_Q4_K ? K / QK_K * kquant_block_bytes(wfmt) : K / QK * quant_block_bytes(fmt), fmt};
    parallel_for(i8_ceil_div(N, I8_ROWS), repack_task, &c);
}

// weight row n of the repacked W, dequantized into w [K] (for rows of x with NaN / Inf, which
// take fp32 arithmetic so that they propagate as the op contract says)
static void dequant_row(float* w, const uint8_t* packed, int64_t n, int64_t K, int fmt) {
    const uint8_t* p = packed + (n / I8_ROWS) * int8_panel_bytes(fmt, K);
    for (int64_t b = 0; b < K / QK; ++b) int8_dequant_block(w + b * QK, 1, p, b, (int)(n % I8_ROWS), fmt);
}

struct Int8Call {
    const Int8Kernels* k;
    void* out;
    const void* x;
    const uint8_t* packed;
    const void* bias;
    int64_t M, N, K, xs, nb, pb, panels_per_task;
    int adt, fmt;
    int8_t* q;        // [M][K]
    float *d, *s;     // [M][nb]
    int32_t* xo;      // [M][nb][4] (int8_panel_offsets)
    uint8_t* finite;  // [M]: 0 where the row holds a NaN / Inf
};

// The integer offsets of one quantized row q [nb * 32]: per block [-32 S0, -32 S1, -8 S, -128 S] (S0,
// S1: the sums of weights 0..15 and 16..31, S = S0 + S1), where Q6_K's halves, Q4_0's and Q8_0's sums
// start (their codes are unsigned: u - 32, n - 8, w + 128)
void int8_panel_offsets(int32_t* xo, const int8_t* q, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        int s0 = 0, s1 = 0;
        for (int t = 0; t < 16; ++t) {
            s0 += q[b * QK + t];
            s1 += q[b * QK + 16 + t];
        }
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
    int8_panel_offsets(c.xo + m * c.nb * 4, c.q + m * c.K, c.nb);
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

// a run of panels against every row of x, in chunks of up to `rows` rows of x (equal sizes): the
// panel's region stays in L1 (L2 for the longest K) across the chunks
static void panels_task(void* ctx, int64_t t, int thread) {
    const Int8Call& c = *(const Int8Call*)ctx;
    const int64_t N = c.N, K = c.K, nb = c.nb, M = c.M;
    const int64_t panels = i8_ceil_div(N, I8_ROWS);
    const int64_t p0 = t * c.panels_per_task, p1 = i8_min(panels, p0 + c.panels_per_task);
    const int64_t chunks = i8_ceil_div(M, c.k->rows);
    float* wrow = nullptr;
    for (int64_t p = p0; p < p1; ++p) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
            const int64_t m0 = ch * M / chunks;
            const int R = (int)((ch + 1) * M / chunks - m0);
            alignas(64) float y[I8_PANEL_ROWS * I8_ROWS];
            c.k->panel(y, c.q + m0 * K, c.d + m0 * nb, c.s + m0 * nb, c.xo + m0 * nb * 4, R, K, c.packed + p * c.pb, c.fmt);
            store_sums(c, y, I8_ROWS, m0, R, p * I8_ROWS, (int)i8_min(I8_ROWS, N - p * I8_ROWS), thread, wrow);
        }
    }
}

void linear_int8(const Int8Kernels* k, void* out, const void* x, const uint8_t* packed, const void* bias, int64_t M,
                 int64_t N, int64_t K, int64_t xs, int adt, int fmt) {
    Int8Call c;
    c.k = k; c.out = out; c.x = x; c.packed = packed; c.bias = bias;
    c.M = M; c.N = N; c.K = K; c.xs = xs; c.adt = adt; c.fmt = fmt;
    c.nb = K / QK;
    c.pb = int8_panel_bytes(fmt, K);
    // scratch (thread 0, slots 4 and 5), taken before any task runs: q [M][K] int8, d, s [M][nb],
    // xo [M][nb][4], finite [M]
    c.q = (int8_t*)scratch(0, 4, (size_t)i8_ceil_div(M * K, 4));
    float* ds = scratch(0, 5, (size_t)(6 * M * c.nb + i8_ceil_div(M, 4)));
    c.d = ds;
    c.s = ds + M * c.nb;
    c.xo = (int32_t*)(ds + 2 * M * c.nb);
    c.finite = (uint8_t*)(ds + 6 * M * c.nb);
    if (M * K >= 16384) parallel_for(M, quantize_task, &c);
    else for (int64_t m = 0; m < M; ++m) quantize_task(&c, m, 0);

    const int64_t panels = i8_ceil_div(N, I8_ROWS), threads = pool_threads();
    if (M <= I8_DECODE_MAX_M) {
        // decode: long contiguous runs, 2 per thread (a thread streams one region and the hardware
        // prefetcher keeps up; with 8 per thread every matrix of SmolLM2 or a Qwen2-0.5B restarted its
        // streams 8 times: 1.06x / 1.19x tok/s for 2 over 8, alternated in one process on a Zen 5),
        // the second half left for whichever thread is free first
        c.panels_per_task = i8_max(1, i8_ceil_div(panels, 2 * threads));
    } else {
        // prefill: runs of ~32 KiB of weights (kept in L1/L2 across the chunks of rows of x), but
        // enough runs for every thread
        c.panels_per_task = i8_max(1, i8_min(32768 / c.pb, i8_ceil_div(panels, 2 * threads)));
    }
    parallel_for(i8_ceil_div(panels, c.panels_per_task), panels_task, &c);
}
