// The integer route of linear for GGUF block weights (Q8_0, Q4_0, Q4_1): declarations.
//
// Per linear call each row of x is quantized once to int8 in blocks of 32 with an fp32 scale
// d_x = amax / 127 (q = round-to-nearest-even(x * 127 / amax)), plus s_x = d_x * sum(q) for the
// Q4 offsets; every output row then takes integer dot products against the same quantized row:
//   Q8_0: y = sum_b d_w d_x (w . q)
//   Q4_0: y = sum_b d_w d_x (n . q) - 8 d_w s_x        (n: the unsigned nibbles, w = d_w (n - 8))
//   Q4_1: y = sum_b d_w d_x (n . q) + m_w s_x          (w = d_w n + m_w)
//
// Weights are repacked at prepare time into groups of I8_ROWS = 4 output rows (int8_repack):
//   group g (rows 4g .. 4g+3, rows past N zero), nb = K / 32 blocks, one contiguous region of nb
//   records, one per block b, each:
//     quants  [4 rows][16 (Q4: GGUF nibble order) | 32 (Q8_0: int8)] bytes
//     d       [4 rows] fp16
//     m       [4 rows] fp16                                          (Q4_1 only)
//   (int8_record_bytes: 72 Q4_0, 80 Q4_1, 136 Q8_0), the group padded to a multiple of 64 bytes.
//   One 32-byte load carries one block of two rows (Q4) or one row (Q8_0), and a thread reads its
//   groups as one forward stream: scales next to their quants (with the scales in regions of their
//   own after the quants, a group was three streams and groups of K > 768 streamed ~1.5x slower).
//   The layout is the same on every instruction-set path.
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
    // y [R][4] (row stride 4) = R <= 4 quantized rows (q row stride K, d / s row stride nb) against
    // the one repacked group at `group`; fmt: QFormat
    void (*dot_group)(float* y, const int8_t* q, const float* d, const float* s, int R, int64_t K,
                      const uint8_t* group, int fmt);
};

const Int8Kernels* int8_kernels_portable();
#if defined(__x86_64__)
const Int8Kernels* int8_kernels_avx2();
const Int8Kernels* int8_kernels_avxvnni();
const Int8Kernels* int8_kernels_avx512vnni();
#endif

// bytes of one block's quants in a group's record: 4 rows x 32 (Q8_0) or 16 (Q4)
static constexpr int64_t int8_quant_bytes(int fmt) { return fmt == Q8_0 ? 128 : 64; }
// bytes of one block's record in a repacked group: its quants, then 4 fp16 d (then 4 fp16 m for Q4_1)
static constexpr int64_t int8_record_bytes(int fmt) { return int8_quant_bytes(fmt) + (fmt == Q4_1 ? 16 : 8); }
// bytes of one repacked group of 4 rows (a multiple of 64)
int64_t int8_group_bytes(int fmt, int64_t K);
// out [ceil(N/4) groups] = GGUF blocks [N][K/32] of format fmt, repacked
void int8_repack(uint8_t* out, const uint8_t* blocks, int64_t N, int64_t K, int fmt);
// out [M, N] (dtype adt) = x [M, K] (row stride xs, dtype adt) @ W^T + bias, W repacked (int8_repack)
void linear_int8(const Int8Kernels* k, void* out, const void* x, const uint8_t* packed, const void* bias, int64_t M,
                 int64_t N, int64_t K, int64_t xs, int adt, int fmt);
