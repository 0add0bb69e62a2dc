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
// Weights are repacked at prepare time into panels of I8_ROWS = 16 output rows (int8_repack): panel p
// (rows 16p .. 16p+15, rows past N zero) is one contiguous region of nb = K / 32 records, one per
// block b (int8_record), each already in the order the dot products consume: code vectors of 64
// bytes, element r (4 bytes) of a vector holding output row r. Vector j holds weights 4j .. 4j+3 of
// every row, so one vpdpbusd against 4 bytes of x broadcast does 64 multiply-adds for all 16 rows,
// and the 16 sums come out in row order (the earlier layout of 4-row groups made the kernels
// transpose every block in registers, ~40% of a step of 8 sequences):
//     codes   Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K: 4 vectors (256 bytes); byte i of element r of vector
//             j = code of weight 4j+i (low nibble) | code of weight 16+4j+i (high nibble), row r;
//             Q8_0: 8 vectors (512 bytes) of w + 128 (unsigned), byte i of element r of vector j =
//             weight 4j+i of row r
//     high    Q5_K: 1 vector, bit j of byte i of element r = fifth bit of weight 4j+i (j < 8);
//             Q6_K: 2 vectors, vector v bits 2j, 2j+1 of byte i of element r = high 2 bits of weight
//             16v + 4j+i (j < 4)
//     scales  Q4_0 / Q8_0: d [16] fp16; Q4_1: d [16], m [16] fp16; Q4_K / Q5_K: sc [16], m [16]
//             uint8 (the 32-weight sub-block's 6-bit scale and min); Q6_K: d [16] fp16, then the
//             int8 scales of weights 0..15 [16] and of 16..31 [16]
//   and for Q4_K / Q5_K, before each super-block's 8 records, a header of its [16] fp16 d, then [16]
//   fp16 dmin. (int8_record_bytes: 288 Q4_0, 320 Q4_1, 544 Q8_0, 288 Q4_K, 352 Q5_K, 448 Q6_K; a
//   panel padded to a multiple of 64 bytes.) A thread reads its panels as one forward stream. The
//   layout is the same on every instruction-set path (the 256-bit paths read each panel as two
//   halves of 8 rows: the low / high 32 bytes of each vector). The K-quants keep their codes,
//   scales and mins as stored (every weight exact): 4.625 / 5.5 / 7 bits a weight against the
//   file's 4.5 / 5.5 / 6.56.
//
// Kernels: panel (one panel against up to `rows` rows of x: a decode step of one sequence is one
// row; longer runs go in chunks, the panel's region staying in L1 between them).
#pragma once

#include "common.h"

static const int I8_ROWS = 16;
// rows of x (sequences of a decode step) that run on int8 activations by default; more rows are a
// prefill, which runs on fp32 activations unless set_int8_prefill(true)
static const int I8_DECODE_MAX_M = 16;
// rows of x a panel call takes at most on any path (Int8Kernels::rows: 16 on the amx path, whose
// tiles hold 16 rows; 8 or 4 on the others)
static const int I8_PANEL_ROWS = 16;

struct Int8Kernels {
    const char* name;
    // q [K] int8, d [K/32], s [K/32] = the quantized fp32 row x [K]; returns false (and leaves
    // q, d, s unspecified) when x holds a NaN or an Inf
    bool (*quantize_row)(int8_t* q, float* d, float* s, const float* x, int64_t K);
    // y [R][16] (row stride 16) = R <= rows quantized rows (q row stride K, d / s row stride nb, xo
    // row stride 4 nb: int8_panel_offsets) against the panel at p; fmt: QFormat
    void (*panel)(float* y, const int8_t* q, const float* d, const float* s, const int32_t* xo, int R, int64_t K,
                  const uint8_t* p, int fmt);
    int rows;  // rows of x a panel call takes at most (<= I8_PANEL_ROWS)
};

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
// bytes of one record's code vectors (int8.h layout: 16 rows x 32 codes, nibbles or bytes)
static constexpr int64_t int8_code_bytes(int fmt) { return fmt == Q8_0 ? 512 : 256; }
// bytes of one record's codes and high bits (Q5_K: 64, Q6_K: 128)
static constexpr int64_t int8_quant_bytes(int fmt) {
    return int8_code_bytes(fmt) + (fmt == Q6_K ? 128 : fmt == Q5_K ? 64 : 0);
}
// bytes of one block's record: its quants, then 16 fp16 d (and 16 fp16 m for Q4_1, 2 x 16 int8
// scales for Q6_K), or the 16 scales and 16 mins (uint8) of Q4_K / Q5_K
static constexpr int64_t int8_record_bytes(int fmt) {
    return int8_quant_bytes(fmt) + (fmt == Q4_1 || fmt == Q6_K ? 64 : 32);
}
// bytes of a Q4_K / Q5_K super-block's header: 16 fp16 d, 16 fp16 dmin
static constexpr int64_t int8_header_bytes(int fmt) { return int8_has_header(fmt) ? 64 : 0; }
// blocks a header covers (1 where there is none)
static constexpr int64_t int8_span(int fmt) { return int8_has_header(fmt) ? QK_K / QK : 1; }
// byte offset of block b's record in its panel
static constexpr int64_t int8_record_offset(int fmt, int64_t b) {
    return (b / int8_span(fmt)) * (int8_header_bytes(fmt) + int8_span(fmt) * int8_record_bytes(fmt)) +
           int8_header_bytes(fmt) + (b % int8_span(fmt)) * int8_record_bytes(fmt);
}
// the byte of a record's code vectors that holds weight t (< 32) of row r: the low nibble for t < 16,
// the high one for t >= 16 (Q8_0: the whole byte, w + 128)
static constexpr int64_t int8_code_at(int fmt, int r, int t) {
    return (fmt == Q8_0 ? t / 4 : (t % 16) / 4) * 64 + 4 * r + t % 4;
}

static inline float int8_half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return f16_to_f32(h);
}

// the unsigned code of weight t of row r in the record at rec (Q8_0: w + 128; Q6_K: u, w = d sc (u - 32))
static inline int int8_code(const uint8_t* rec, int r, int t, int fmt) {
    const int c = rec[int8_code_at(fmt, r, t)];
    if (fmt == Q8_0) return c;
    int u = t < 16 ? c & 15 : c >> 4;
    if (fmt == Q5_K) u |= ((rec[256 + 4 * r + t % 4] >> (t / 4)) & 1) << 4;
    if (fmt == Q6_K) u |= ((rec[256 + 64 * (t / 16) + 4 * r + t % 4] >> (2 * ((t % 16) / 4))) & 3) << 4;
    return u;
}

// The scale factors of row r (< 16) in block b's record of a panel: w = scale u + offw for weights
// 0..15 and w = scale1 u + offw for 16..31 (u: int8_code; Q8_0 u - 128, Q6_K u - 32, Q4_0 u - 8):
// d, or d sc (the K-quants: d from the super-block's header; Q6_K: the half's int8 sc), and m for
// Q4_1 or -dmin m for Q4_K / Q5_K (zero otherwise). The kernels take the codes' offsets as integers.
static inline void int8_record_scales(float& scale, float& scale1, float& offw, const uint8_t* panel, int64_t b,
                                      int r, int fmt) {
    const uint8_t* sc = panel + int8_record_offset(fmt, b) + int8_quant_bytes(fmt);
    offw = 0.f;
    if (int8_has_header(fmt)) {
        const uint8_t* hdr = panel + (b / int8_span(fmt)) * (int8_header_bytes(fmt) + int8_span(fmt) * int8_record_bytes(fmt));
        scale = scale1 = int8_half(hdr + 2 * r) * (float)sc[r];
        offw = -(int8_half(hdr + 32 + 2 * r) * (float)sc[16 + r]);
        return;
    }
    const float d = int8_half(sc + 2 * r);
    scale = scale1 = d;
    if (fmt == Q4_1) offw = int8_half(sc + 32 + 2 * r);
    if (fmt == Q6_K) {
        scale = d * (float)(int8_t)sc[32 + r];
        scale1 = d * (float)(int8_t)sc[48 + r];
    }
}

// the integer offset of a format's unsigned codes: w = scale (u - int8_code_offset) (+ offw for Q4_1 and the
// K-quants)
static constexpr int int8_code_offset(int fmt) { return fmt == Q8_0 ? 128 : fmt == Q6_K ? 32 : fmt == Q4_0 ? 8 : 0; }

// the 32 weights of row r (< 16) of block b of a repacked panel, dequantized into w[t * ws] (the
// values of quant.dequantize: exact in fp32, or, for Q4_K / Q5_K, ggml's fp32 order d sc q - dmin m)
static inline void int8_dequant_block(float* w, int64_t ws, const uint8_t* panel, int64_t b, int r, int fmt) {
    const uint8_t* rec = panel + int8_record_offset(fmt, b);
    float scale, scale1, offw;
    int8_record_scales(scale, scale1, offw, panel, b, r, fmt);
    const bool offset = fmt == Q4_1 || int8_has_header(fmt);
    for (int t = 0; t < QK; ++t) {
        const float v = (t < 16 ? scale : scale1) * (float)(int8_code(rec, r, t, fmt) - int8_code_offset(fmt));
        w[t * ws] = offset ? v + offw : v;
    }
}

// the integer offsets of one quantized row q [nb * 32] (xo [nb][4]: Int8Kernels::panel's xo; int8.cpp)
void int8_panel_offsets(int32_t* xo, const int8_t* q, int64_t nb);
// bytes of one repacked panel of 16 rows (a multiple of 64)
int64_t int8_panel_bytes(int fmt, int64_t K);
// out [ceil(N/16) panels] = GGUF blocks [N][K/32] of format fmt (K-quants: super-blocks [N][K/256]), repacked
void int8_repack(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt);
// out [M, N] (dtype adt) = x [M, K] (row stride xs, dtype adt) @ W^T + bias, W repacked (int8_repack)
void linear_int8(const Int8Kernels* k, void* out, const void* x, const uint8_t* packed, const void* bias, int64_t M,
                 int64_t N, int64_t K, int64_t xs, int adt, int fmt);
