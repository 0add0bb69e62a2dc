// The int8 route's repacking and driver (int8.h): quantize x once per call, then run the chosen
// path's dot products over groups of 4 output rows on the pool. Plain C++ (no ISA extension):
// all vector work happens in the path's kernels.
#include "int8.h"

static inline int64_t i8_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t i8_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t i8_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t int8_group_bytes(int fmt, int64_t K) {
    return i8_ceil_div(K / QK * int8_record_bytes(fmt), 64) * 64;
}

void int8_repack(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt) {
    const int64_t nb = K / QK, bb = quant_block_bytes(fmt), row_bytes = nb * bb, qb = int8_quant_bytes(fmt);
    const int64_t gb = int8_group_bytes(fmt, K), groups = i8_ceil_div(N, I8_ROWS), rec = int8_record_bytes(fmt);
    const int64_t rq = qb / I8_ROWS;  // quant bytes of one row's block: 32 (Q8_0) or 16
    std::memset(out, 0, (size_t)(groups * gb));
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
    const int64_t nb = K / QK, qb = int8_quant_bytes(fmt), rq = qb / I8_ROWS, i = n % I8_ROWS, rec = int8_record_bytes(fmt);
    const uint8_t* g = packed + (n / I8_ROWS) * int8_group_bytes(fmt, K);
    auto half = [](const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return f16_to_f32(h); };
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* r = g + b * rec;
        const uint8_t* qs = r + i * rq;
        const float d = half(r + qb + i * 2);
        float* wb = w + b * QK;
        if (fmt == Q8_0) {
            for (int j = 0; j < QK; ++j) wb[j] = d * (float)(int8_t)qs[j];
        } else {
            const float m = fmt == Q4_0 ? -8.0f * d : half(r + qb + 8 + i * 2);
            for (int j = 0; j < 16; ++j) {
                wb[j] = d * (float)(qs[j] & 15) + m;
                wb[j + 16] = d * (float)(qs[j] >> 4) + m;
            }
        }
    }
}

struct Int8Call {
    const Int8Kernels* k;
    void* out;
    const void* x;
    const uint8_t* packed;
    const void* bias;
    int64_t M, N, K, xs, nb, gb, groups_per_task;
    int adt, fmt;
    int8_t* q;        // [M][K]
    float *d, *s;     // [M][nb]
    uint8_t* finite;  // [M]: 0 where the row holds a NaN / Inf
};

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
}

// a run of groups against every row of x, 4 rows of x at a time (the run's weights stay in cache
// between row chunks when M > 4). The common case (fp32 out, every row finite) stores the sums
// straight into out, the bias added in the same pass; other rows go through the general path.
static void groups_task(void* ctx, int64_t t, int thread) {
    const Int8Call& c = *(const Int8Call*)ctx;
    const int64_t N = c.N, K = c.K, nb = c.nb, M = c.M;
    const int64_t groups = i8_ceil_div(N, I8_ROWS);
    const int64_t g0 = t * c.groups_per_task, g1 = i8_min(groups, g0 + c.groups_per_task);
    const bool f32 = c.adt == DT_F32;
    const float* bias32 = f32 ? (const float*)c.bias : nullptr;
    float* wrow = nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += I8_ROWS) {
        const int R = (int)i8_min(I8_ROWS, M - m0);
        bool chunk_fast = f32;
        for (int r = 0; r < R; ++r) chunk_fast = chunk_fast && c.finite[m0 + r];
        for (int64_t g = g0; g < g1; ++g) {
            alignas(64) float y[I8_ROWS * I8_ROWS];
            c.k->dot_group(y, c.q + m0 * K, c.d + m0 * nb, c.s + m0 * nb, R, K, c.packed + g * c.gb, c.fmt);
            const int64_t n0 = g * I8_ROWS;
            const int nn = (int)i8_min(I8_ROWS, N - n0);
            if (chunk_fast) {
                for (int r = 0; r < R; ++r) {
                    float* o = (float*)c.out + (m0 + r) * N + n0;
                    for (int i = 0; i < nn; ++i) o[i] = y[r * I8_ROWS + i] + (bias32 ? bias32[n0 + i] : 0.f);
                }
                continue;
            }
            for (int r = 0; r < R; ++r) {
                const int64_t m = m0 + r;
                for (int i = 0; i < nn; ++i) {
                    const int64_t n = n0 + i;
                    float v = y[r * I8_ROWS + i];
                    if (!c.finite[m]) {  // fp32 dot product: NaN / Inf propagate like the reference's
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
    }
}

void linear_int8(const Int8Kernels* k, void* out, const void* x, const uint8_t* packed, const void* bias, int64_t M,
                 int64_t N, int64_t K, int64_t xs, int adt, int fmt) {
    Int8Call c;
    c.k = k; c.out = out; c.x = x; c.packed = packed; c.bias = bias;
    c.M = M; c.N = N; c.K = K; c.xs = xs; c.adt = adt; c.fmt = fmt;
    c.nb = K / QK;
    c.gb = int8_group_bytes(fmt, K);
    // scratch (thread 0, slots 4 and 5), taken before any task runs: q [M][K] int8, d, s [M][nb], finite [M]
    c.q = (int8_t*)scratch(0, 4, (size_t)i8_ceil_div(M * K, 4));
    float* ds = scratch(0, 5, (size_t)(2 * M * c.nb + i8_ceil_div(M, 4)));
    c.d = ds;
    c.s = ds + M * c.nb;
    c.finite = (uint8_t*)(ds + 2 * M * c.nb);
    if (M * K >= 16384) parallel_for(M, quantize_task, &c);
    else for (int64_t m = 0; m < M; ++m) quantize_task(&c, m, 0);

    const int64_t groups = i8_ceil_div(N, I8_ROWS), threads = pool_threads();
    if (M <= I8_ROWS) {
        // decode: long contiguous runs (a thread streams one region), about 8 per thread
        c.groups_per_task = i8_max(4, i8_ceil_div(groups, 8 * threads));
    } else {
        // prefill: runs of ~32 KiB of weights (kept in L1/L2 across the chunks of 4 rows of x),
        // but enough runs for every thread
        c.groups_per_task = i8_max(1, i8_min(32768 / c.gb, i8_ceil_div(groups, 2 * threads)));
    }
    parallel_for(i8_ceil_div(groups, c.groups_per_task), groups_task, &c);
}
