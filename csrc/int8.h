// The integer route of linear for GGUF block weights (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K): declarations.
//
// Per linear call each row of x is quantized once to int8 in blocks of 32 with an fp32 scale
// d_x = amax / 127 (q = round-to-nearest-even(x * 127 / amax)), plus s_x = d_x * sum(q) for the
// offsets; every output row then takes integer dot products against the same quantized row:
//   Q8_0: y = sum_b d_w d_x (w . q)
//   Q4_0: y = sum_b d_w d_x (n . q) - 8 d_w s_x        (n: the unsigned nibbles, w = d_w (n - 8))
//   Q4_1: y = sum_b d_w d_x (n . q) + m_w s_x          (w = d_w n + m_w)
//   Q4_K, Q5_K: as Q4_1 with d_w = d sc and m_w = -dmin m (sc, m: the 32-weight sub-block's 6-bit
//         scale and min, d, dmin: the super-block's fp16 scales; Q5_K's codes have a fifth bit)
//   Q6_K: y = sum_b sum_{h=0,1} d_w sc_h d_x (u_h . q_h - 32 sum(q_h))
//         (u: the unsigned 6-bit codes, w = d_w sc (u - 32); h: the block's two 16-weight sub-blocks,
//         each with its own int8 scale sc; sum(q_h) from the per-call offsets xo, below)
//
// Weights are repacked at prepare time into groups of I8_ROWS = 4 output rows (int8_repack):
//   group g (rows 4g .. 4g+3, rows past N zero), nb = K / 32 blocks, one contiguous region of nb
//   records, one per block b (int8_record), each:
//     quants  [4 rows][16 (Q4*, Q5_K, Q6_K: GGUF nibble order) | 32 (Q8_0: int8)] bytes
//     qh      Q5_K: [16] bytes, the codes' fifth bits (int8_q5_qh_bit);
//             Q6_K: [32] bytes, the codes' high 2 bits (int8_q6_qh_shift)
//     d       [4 rows] fp16                                          (not Q4_K, Q5_K)
//     m       [4 rows] fp16                                          (Q4_1 only)
//     sc      Q4_K, Q5_K: [4 rows] uint8 scales, then [4 rows] uint8 mins;
//             Q6_K: [8] int8, the sub-block scales in the kernel's lane order (int8_q6_sc_index)
//   and for Q4_K / Q5_K, before each super-block's 8 records, a header of its [4 rows] fp16 d, then
//   [4 rows] fp16 dmin. (int8_record_bytes: 72 Q4_0, 80 Q4_1, 136 Q8_0, 72 Q4_K, 88 Q5_K, 112 Q6_K),
//   the group padded to a multiple of 64 bytes. One 32-byte load carries one block of two rows (the
//   nibbles) or one row (Q8_0), and a thread reads its groups as one forward stream: scales next to
//   their quants (with the scales in regions of their own after the quants, a group was three
//   streams and groups of K > 768 streamed ~1.5x slower). The layout is the same on every
//   instruction-set path. The K-quants keep their codes, scales and mins as stored (every weight
//   exact): 4.625 / 5.5 / 7 bits a weight against the file's 4.5 / 5.5 / 6.56.
//
// Kernels: dot_group (one group against up to 4 rows of x: a decode step of one sequence) and, on
// the SIMD paths, panel (4 groups on zmm, 2 on ymm, against up to 8 / 4 rows of x: 2+ rows), which
// transposes the groups' codes in registers into vectors of 4-byte quads of all the panel's output
// rows (int8_impl.h, docs/cpu-backend.md "Panel kernels").
#pragma once

#include "common.h"

static const int I8_ROWS = 4;
// rows of x (sequences of a decode step) that run on int8 activations by default; more rows are a
// prefill, which runs on fp32 activations unless set_int8_prefill(true)
static const int I8_DECODE_MAX_M = 16;

struct Int8Kernels {
    const char* name;
    // q [K] int8, d [K/32], s [K/32] = the quantized fp32 row x [K]; returns false (and leaves
    // q, d, s unspecified) when x holds a NaN or an Inf
    bool (*quantize_row)(int8_t* q, float* d, float* s, const float* x, int64_t K);
    // y [R][4] (row stride 4) = R <= 4 quantized rows (q row stride K, d / s row stride nb, xo row
    // stride 8 nb: int8_offsets, Q6_K only) against the one repacked group at `group`; fmt: QFormat
    void (*dot_group)(float* y, const int8_t* q, const float* d, const float* s, const int32_t* xo, int R,
                      int64_t K, const uint8_t* group, int fmt);
    // y [R][16] (row stride 16) = R <= panel_rows quantized rows (as dot_group, but xo row stride 4 nb:
    // int8_panel_offsets, every format)
    // against the ng <= panel_groups groups from g0 (group stride gb), the output rows of a panel at once;
    // null where the path has none (the driver then runs dot_group over 4 rows of x at a time). tc: null,
    // or room for the panel's nb = K / 32 transcoded blocks (I8_PANEL_CACHE_BYTES each), which the call
    // with tc_fill writes and the calls without it read back (the other chunks of rows of x)
    void (*panel)(float* y, const int8_t* q, const float* d, const float* s, const int32_t* xo, int R, int64_t K,
                  const uint8_t* g0, int64_t gb, int ng, uint8_t* tc, bool tc_fill, int fmt);
    int panel_groups;        // groups a panel call takes (4: 16 output rows on zmm, 2: 8 on ymm)
    int panel_rows;          // rows of x a panel call takes at most
    unsigned panel_formats;  // bit fmt set: the panel computes QFormat fmt (else dot_group does)
};

// rows of x a panel call takes at most on any path (Int8Kernels::panel_rows; the registers of a zmm
// panel of 16 output rows hold 8 rows' sums)
static const int I8_PANEL_ROWS = 8;
// bytes of one transcoded block of a panel: 8 vectors of quads, 3 of scales (64 bytes each)
static const int64_t I8_PANEL_CACHE_BYTES = 11 * 64;
// the fewest rows of x that run on panels where the path has them. One row stays on dot_group: a
// decode step of one sequence is a stream from memory, and a thread's groups read one after another
// stream best (Qwen2-0.5B-shaped Q8_0 / Q4_0 on a Zen 5, alternated in one process: panels 1.07x /
// 1.03x the step time at one sequence, 0.83x at two, 0.68-0.83x at eight)
static const int I8_PANEL_MIN_M = 2;

const Int8Kernels* int8_kernels_portable();
#if defined(__x86_64__)
const Int8Kernels* int8_kernels_avx2();
const Int8Kernels* int8_kernels_avxvnni();
const Int8Kernels* int8_kernels_avx512vnni();
#endif

static inline bool int8_format_valid(int64_t fmt) { return fmt >= Q8_0 && fmt <= Q5_K; }
// the K-quants of 32-weight sub-blocks with a per-super-block header (d, dmin)
static constexpr bool int8_has_header(int fmt) { return fmt == Q4_K || fmt == Q5_K; }
// the GGUF weight format (WeightFormat) int8_repack reads for a format: blocks of 32, or super-blocks
static constexpr int int8_source_format(int fmt) {
    return fmt == Q6_K ? W_Q6_K : fmt == Q4_K ? W_Q4_K : fmt == Q5_K ? W_Q5_K : W_Q8_0 + fmt;
}
// bytes of one block's quants in a group's record: 4 rows x 32 (Q8_0) or 16 (the nibbles), and the
// high bits (Q5_K 16 bytes, Q6_K 32)
static constexpr int64_t int8_quant_bytes(int fmt) {
    return fmt == Q8_0 ? 128 : fmt == Q6_K ? 96 : fmt == Q5_K ? 80 : 64;
}
// bytes of one block's record in a repacked group: its quants, then 4 fp16 d (then 4 fp16 m for Q4_1,
// 8 int8 scales for Q6_K), or the 4 scales and 4 mins (uint8) of Q4_K / Q5_K
static constexpr int64_t int8_record_bytes(int fmt) {
    return int8_quant_bytes(fmt) + (fmt == Q4_1 || fmt == Q6_K ? 16 : 8);
}
// bytes of a Q4_K / Q5_K super-block's header: 4 fp16 d, 4 fp16 dmin
static constexpr int64_t int8_header_bytes(int fmt) { return int8_has_header(fmt) ? 16 : 0; }
// blocks a header covers (1 where there is none)
static constexpr int64_t int8_span(int fmt) { return int8_has_header(fmt) ? QK_K / QK : 1; }
// byte offset of block b's record in its group
static constexpr int64_t int8_record_offset(int fmt, int64_t b) {
    return (b / int8_span(fmt)) * (int8_header_bytes(fmt) + int8_span(fmt) * int8_record_bytes(fmt)) +
           int8_header_bytes(fmt) + (b % int8_span(fmt)) * int8_record_bytes(fmt);
}
// Q5_K records: the fifth bit of weight t (< 32) of row i is bit int8_q5_qh_bit(i, t) of qh byte
// t % 16: bit 2v + L for vector v of [row 0 | row 1] (v = 0: t < 16, 1: t >= 16) and [row 2 | row 3]
// (2, 3), lane L = i % 2. Broadcast to both lanes and lane 1 shifted right by 1, a shift and mask each
// give the bit under the nibbles of the four vectors
static constexpr int int8_q5_qh_bit(int i, int t) { return 2 * ((i / 2) * 2 + (t >= 16 ? 1 : 0)) + i % 2; }
// Q6_K records: the high 2 bits of weight t (< 32) of row i sit in qh byte (i % 2) * 16 + t % 16 at
// this shift, so one 32-byte load and a shift and mask each give the 2 bits under the low nibbles of
// [row 0 | row 1] (t < 16: shift 0; t >= 16: 2) and of [row 2 | row 3] (4; 6)
static constexpr int int8_q6_qh_shift(int i, int t) { return (i / 2) * 4 + (t >= 16 ? 2 : 0); }
// Q6_K records: where the scale of sub-block h (0: weights 0..15, 1: 16..31) of row i sits in the
// record's 8 scales: the lane order of the kernels' sums [r0h0 r2h0 r0h1 r2h1 | r1h0 r3h0 r1h1 r3h1]
static constexpr int int8_q6_sc_index(int i, int h) { return (i % 2) * 4 + h * 2 + i / 2; }

static inline float int8_half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}

// the 32 weights of row i (< 4) of block b of a repacked group, dequantized (the values of
// quant.dequantize: exact in fp32, or, for Q4_K / Q5_K, ggml's fp32 order d sc q - dmin m)
static inline void int8_dequant_block(float* w, const uint8_t* group, int64_t b, int i, int fmt) {
    const uint8_t* r = group + int8_record_offset(fmt, b);
    const int64_t qb = int8_quant_bytes(fmt);
    const uint8_t* nib = r + 16 * i;
    if (int8_has_header(fmt)) {
        const uint8_t* hdr = r - (b % int8_span(fmt)) * int8_record_bytes(fmt) - int8_header_bytes(fmt);
        const float dsc = int8_half(hdr + 2 * i) * (float)r[qb + i], dmn = int8_half(hdr + 8 + 2 * i) * (float)r[qb + 4 + i];
        for (int t = 0; t < QK; ++t) {
            int u = (nib[t % 16] >> (t < 16 ? 0 : 4)) & 15;
            if (fmt == Q5_K) u |= ((r[64 + t % 16] >> int8_q5_qh_bit(i, t)) & 1) << 4;
            w[t] = dsc * (float)u - dmn;
        }
        return;
    }
    const float d = int8_half(r + qb + 2 * i);
    if (fmt == Q8_0) {
        for (int t = 0; t < QK; ++t) w[t] = d * (float)(int8_t)r[32 * i + t];
        return;
    }
    if (fmt == Q6_K) {
        const uint8_t* qh = r + 64 + (i % 2) * 16;
        const int8_t* sc = (const int8_t*)(r + qb + 8);
        const float d0 = d * (float)sc[int8_q6_sc_index(i, 0)], d1 = d * (float)sc[int8_q6_sc_index(i, 1)];
        for (int t = 0; t < 16; ++t) {
            const int lo = (nib[t] & 15) | (((qh[t] >> int8_q6_qh_shift(i, t)) & 3) << 4);
            const int hi = (nib[t] >> 4) | (((qh[t] >> int8_q6_qh_shift(i, t + 16)) & 3) << 4);
            w[t] = d0 * (float)(lo - 32);
            w[t + 16] = d1 * (float)(hi - 32);
        }
        return;
    }
    const float m = fmt == Q4_1 ? int8_half(r + qb + 8 + 2 * i) : -8.0f * d;
    for (int t = 0; t < 16; ++t) {
        w[t] = d * (float)(nib[t] & 15) + m;
        w[t + 16] = d * (float)(nib[t] >> 4) + m;
    }
}

// bytes of one repacked group of 4 rows (a multiple of 64)
int64_t int8_group_bytes(int fmt, int64_t K);
// out [ceil(N/4) groups] = GGUF blocks [N][K/32] of format fmt (K-quants: super-blocks [N][K/256]), repacked
void int8_repack(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt);
// out [M, N] (dtype adt) = x [M, K] (row stride xs, dtype adt) @ W^T + bias, W repacked (int8_repack)
void linear_int8(const Int8Kernels* k, void* out, const void* x, const uint8_t* packed, const void* bias, int64_t M,
                 int64_t N, int64_t K, int64_t xs, int adt, int fmt);
