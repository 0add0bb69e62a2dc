// linear on K-quant weights (Q4_K, Q5_K, Q6_K) with fp32 activations: y [M, N] = x [M, K] W^T + b.
//
// Included by kernels_impl.h inside each instruction set's namespace (Vec, W, NV, par, gemm, scratch
// ... are in scope), so it is compiled once per path like the other kernels. Not a standalone header.
//
// W stays GGUF super-blocks [N][K/256] (spec.QUANT_FORMATS, K a multiple of 256):
//   Q4_K (144 bytes): fp16 d, fp16 dmin, scales[12] (8 x 6-bit sc, 8 x 6-bit m), qs[128]
//       sub-block s (32 weights) = low (s even) / high (s odd) nibbles of qs[32 (s/2) .. + 32]
//       w = d sc[s] q - dmin m[s]
//   Q5_K (176 bytes): as Q4_K with qh[32] before qs: bit s of qh[l] is bit 4 of weight l of sub-block s
//   Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], fp16 d; 16 sub-blocks of 16 weights;
//       weight i = 128 h + 32 Q + l (half h, quarter Q, l < 32): low 4 bits = nibble Q / 2 of
//       ql[64 h + 32 (Q % 2) + l], high 2 bits = bits 2Q.. of qh[32 h + l];  w = d scales[i / 16] (q - 32)
//
// GEMV (M <= QGEMV_MAX_M, decode): each weight row is read once; a super-block's sub-blocks are
// turned into fp32 codes in registers and dotted with x, each sub-block's partial sum (a vector)
// scaled once by d * sc; Q4_K/Q5_K's mins enter as dmin m[s] * sum(x over the sub-block), from
// per-call sums of x. Threads take contiguous runs of output rows.
// GEMM (prefill): the shared panel GEMM, each [32 rows][256] tile dequantized to fp32 once.

// d * sc[s] and dmin * m[s] of a Q4_K / Q5_K super-block's 8 sub-blocks (exact in fp32). The 12
// packed bytes are unpacked four at a time in 32-bit words (as ggml does): afterwards the bytes of
// u[0], u[1] are sc[0..7] and those of u[2], u[3] are m[0..7].
static inline void kq_scales_mins(float* dsc, float* dmn, const uint8_t* b, const float* f16) {
    uint16_t hd, hm;
    std::memcpy(&hd, b, 2);
    std::memcpy(&hm, b + 2, 2);
    const float d = f16[hd], dmin = f16[hm];
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, low2 = 0x03030303u;
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);  // m[4..7]
    const uint32_t mins_low = u[1] & low6;                        // m[0..3]
    u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);          // sc[4..7]
    u[2] = mins_low;
    u[0] &= low6;                                                 // sc[0..3]
    uint8_t v[16];
    std::memcpy(v, u, 16);
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
        dsc[s] = d * (float)v[s];
        dmn[s] = dmin * (float)v[8 + s];
    }
}

// the 256 weights of one super-block as fp32 (the GEMM's tiles), in ggml's order of operations
// (d sc * q - dmin m), so the values are those of quant.dequantize
template <int FMT>
static inline void kq_dequant(float* out, const uint8_t* b, const float* f16) {
    if (FMT == W_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t* sc = (const int8_t*)(b + 192);
        uint16_t hd;
        std::memcpy(&hd, b + 208, 2);
        const float d = f16[hd];
        for (int h = 0; h < 2; ++h)
            for (int qp = 0; qp < 2; ++qp)
                for (int v = 0; v < NV; ++v) {
                    V lo, hi;
                    Vec::nibbles(ql + 64 * h + 32 * qp + v * W, -32.0f, lo, hi);
                    lo = Vec::fma(Vec::bits(qh + 32 * h + v * W, 2 * qp, 3), Vec::set1(16.0f), lo);
                    hi = Vec::fma(Vec::bits(qh + 32 * h + v * W, 2 * (qp + 2), 3), Vec::set1(16.0f), hi);
                    const int i_lo = 128 * h + 32 * qp + v * W, i_hi = i_lo + 64;
                    Vec::store(out + i_lo, Vec::mul(lo, Vec::set1(d * (float)sc[i_lo / 16])));
                    Vec::store(out + i_hi, Vec::mul(hi, Vec::set1(d * (float)sc[i_hi / 16])));
                }
        return;
    }
    alignas(64) float dsc[8], dmn[8];
    kq_scales_mins(dsc, dmn, b, f16);
    const uint8_t *qh = b + 16, *qs = b + 16 + (FMT == W_Q5_K ? 32 : 0);
    for (int j = 0; j < 4; ++j)
        for (int v = 0; v < NV; ++v) {
            V lo, hi;
            Vec::nibbles(qs + 32 * j + v * W, 0.0f, lo, hi);
            if (FMT == W_Q5_K) {
                lo = Vec::fma(Vec::bits(qh + v * W, 2 * j, 1), Vec::set1(16.0f), lo);
                hi = Vec::fma(Vec::bits(qh + v * W, 2 * j + 1, 1), Vec::set1(16.0f), hi);
            }
            Vec::store(out + 64 * j + v * W, Vec::sub(Vec::mul(lo, Vec::set1(dsc[2 * j])), Vec::set1(dmn[2 * j])));
            Vec::store(out + 64 * j + 32 + v * W,
                       Vec::sub(Vec::mul(hi, Vec::set1(dsc[2 * j + 1])), Vec::set1(dmn[2 * j + 1])));
        }
}

// ---------------------------------------------------------------- GEMV

// One Q4_K / Q5_K super-block against R rows of x (x: its 256 columns, row stride lda):
// c[r] += sum_s d sc[s] (codes_s . x_s), cm[r] += sum_s dmin m[s] xsum[r][s]. G sub-blocks are in
// flight at once (their partial sums are independent FMA chains: 8 for one row, 2 per row for more).
template <int FMT, int R>
static inline void kq45_block(V (&c)[R][2], float* cm, const float* x, int64_t lda, const float* xs,
                              int64_t xs_stride, const uint8_t* b, const float* f16) {
    alignas(64) float dsc[8], dmn[8];
    kq_scales_mins(dsc, dmn, b, f16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        float m = 0.f;
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) m += dmn[s] * xs[r * xs_stride + s];
        cm[r] += m;
    }
    const uint8_t *qh = b + 16, *qs = b + 16 + (FMT == W_Q5_K ? 32 : 0);
    constexpr int G = R == 1 ? 8 : 2;
#pragma GCC unroll 4
    for (int g0 = 0; g0 < 8; g0 += G) {
        V t[R][G];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int s = 0; s < G; ++s) t[r][s] = Vec::zero();
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v)
#pragma GCC unroll 4
            for (int p = 0; p < G / 2; ++p) {
                const int j = g0 / 2 + p;  // the pair of sub-blocks 2j, 2j + 1 sharing qs[32 j ..]
                V lo, hi;
                Vec::nibbles(qs + 32 * j + v * W, 0.0f, lo, hi);
                if (FMT == W_Q5_K) {
                    lo = Vec::fma(Vec::bits(qh + v * W, 2 * j, 1), Vec::set1(16.0f), lo);
                    hi = Vec::fma(Vec::bits(qh + v * W, 2 * j + 1, 1), Vec::set1(16.0f), hi);
                }
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    t[r][2 * p] = Vec::fma(lo, Vec::load(x + r * lda + 64 * j + v * W), t[r][2 * p]);
                    t[r][2 * p + 1] = Vec::fma(hi, Vec::load(x + r * lda + 64 * j + 32 + v * W), t[r][2 * p + 1]);
                }
            }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int s = 0; s < G; ++s) c[r][s & 1] = Vec::fma(t[r][s], Vec::set1(dsc[g0 + s]), c[r][s & 1]);
    }
}

// One Q6_K super-block against R rows of x: per half h and quarter pair qp, the low nibbles of
// ql[64 h + 32 qp ..] are quarter qp and the high ones quarter qp + 2; each quarter is two
// 16-weight sub-blocks (its first and second 16 lanes), so four partial sums per step.
template <int R>
static inline void kq6_block(V (&c)[R][2], const float* x, int64_t lda, const uint8_t* b, const float* f16) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = (const int8_t*)(b + 192);
    uint16_t hd;
    std::memcpy(&hd, b + 208, 2);
    const float d = f16[hd];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
        for (int qp = 0; qp < 2; ++qp) {
            V t[R][4];  // [low quarter first 16, low second 16, high first 16, high second 16]
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
                for (int i = 0; i < 4; ++i) t[r][i] = Vec::zero();
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) {
                V lo, hi;
                Vec::nibbles(ql + 64 * h + 32 * qp + v * W, -32.0f, lo, hi);  // q - 32 once the high bits are in
                lo = Vec::fma(Vec::bits(qh + 32 * h + v * W, 2 * qp, 3), Vec::set1(16.0f), lo);
                hi = Vec::fma(Vec::bits(qh + 32 * h + v * W, 2 * (qp + 2), 3), Vec::set1(16.0f), hi);
                const int half = v * W / 16;  // which 16-weight sub-block of the quarter these lanes are in
                const float* xl = x + 128 * h + 32 * qp + v * W;
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {
                    t[r][half] = Vec::fma(lo, Vec::load(xl + r * lda), t[r][half]);
                    t[r][2 + half] = Vec::fma(hi, Vec::load(xl + 64 + r * lda), t[r][2 + half]);
                }
            }
            const int s_lo = 8 * h + 2 * qp, s_hi = s_lo + 4;  // sub-blocks of quarters qp and qp + 2
            const V d0 = Vec::set1(d * (float)sc[s_lo]), d1 = Vec::set1(d * (float)sc[s_lo + 1]);
            const V d2 = Vec::set1(d * (float)sc[s_hi]), d3 = Vec::set1(d * (float)sc[s_hi + 1]);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                c[r][0] = Vec::fma(t[r][0], d0, c[r][0]);
                c[r][1] = Vec::fma(t[r][1], d1, c[r][1]);
                c[r][0] = Vec::fma(t[r][2], d2, c[r][0]);
                c[r][1] = Vec::fma(t[r][3], d3, c[r][1]);
            }
        }
}

// y[r] = one weight row . x row r, for R rows of x (xsum [R][K/32]: per-sub-block sums of x, Q4_K/Q5_K)
template <int FMT, int R>
static inline void gemv_kquant_row(float* y, const float* A, int64_t lda, const float* xsum, int64_t xsum_stride,
                                   const uint8_t* row, int64_t nsb, const float* f16) {
    constexpr int64_t bb = kquant_block_bytes(FMT);
    V c[R][2];
    float cm[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) { c[r][0] = c[r][1] = Vec::zero(); cm[r] = 0.f; }
    for (int64_t sb = 0; sb < nsb; ++sb) {
        const uint8_t* b = row + sb * bb;
        // software prefetch ~2 KiB ahead, every line of the super-block (as the Q4 GEMV does)
#pragma GCC unroll 4
        for (int64_t off = 0; off < bb; off += 64) __builtin_prefetch(b + 2048 + off);
        if constexpr (FMT == W_Q6_K)
            kq6_block<R>(c, A + sb * QK_K, lda, b, f16);
        else
            kq45_block<FMT, R>(c, cm, A + sb * QK_K, lda, xsum + sb * 8, xsum_stride, b, f16);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) y[r] = Vec::reduce_add(Vec::add(c[r][0], c[r][1])) - cm[r];
}

template <int FMT, int R>
static void gemv_kquant(void* out, const float* A, int64_t lda, const uint8_t* blocks, const void* bias, int64_t N,
                        int64_t K, int adt) {
    const int64_t nsb = K / QK_K, row_bytes = nsb * kquant_block_bytes(FMT), nsub = K / 32;
    // contiguous runs of rows per task, as gemv_quant
    const int64_t rows_per_task = imax(16, ceil_div(N, 8 * (int64_t)pool_threads()));
    const float* f16 = f16_table();
    float* xsum = nullptr;
    if (FMT != W_Q6_K) {
        xsum = scratch(0, 2, (size_t)(R * nsub));
        for (int r = 0; r < R; ++r)
            for (int64_t s = 0; s < nsub; ++s) {
                V acc = Vec::load(A + r * lda + s * 32);
                for (int v = 1; v < NV; ++v) acc = Vec::add(acc, Vec::load(A + r * lda + s * 32 + v * W));
                xsum[r * nsub + s] = Vec::reduce_add(acc);
            }
    }
    auto task = [&](int64_t t, int) {
        int64_t n0 = t * rows_per_task, n1 = imin(N, n0 + rows_per_task);
        float y[QGEMV_MAX_M];
        for (int64_t n = n0; n < n1; ++n) {
            gemv_kquant_row<FMT, R>(y, A, lda, xsum, nsub, blocks + n * row_bytes, nsb, f16);
            for (int r = 0; r < R; ++r) {
                float v = y[r];
                if (bias) v += load_scalar(bias, adt, n);
                store_scalar(out, adt, r * N + n, v);
            }
        }
    };
    par(ceil_div(N, rows_per_task), task);
}

// A batched decode step (QTILE_MIN_M..GEMV_MAX_M rows of x) where Vec::DTILE_R is set (AVX-512,
// AVX2): gemv_dequant_tiles over kq_dequant. The one-row kernels above load all of x for every weight
// row and scale every sub-block's partial sum per row of x; here a weight is decoded once per call.
template <int FMT>
static void gemv_kquant_tiles(void* out, const float* A, int64_t lda, const uint8_t* blocks, const void* bias,
                              int64_t M, int64_t N, int64_t K, int adt) {
    constexpr int64_t bb = kquant_block_bytes(FMT);
    const int64_t nsb = K / QK_K, row_bytes = nsb * bb;
    const float* f16 = f16_table();
    gemv_dequant_tiles(out, A, lda, bias, M, N, K, adt, [&](float* w, int64_t n) {
        const uint8_t* row = blocks + n * row_bytes;
        for (int64_t sb = 0; sb < nsb; ++sb) {
#pragma GCC unroll 4
            for (int64_t off = 0; off < bb; off += 64) __builtin_prefetch(row + (sb + 8) * bb + off);
            kq_dequant<FMT>(w + sb * QK_K, row + sb * bb, f16);
        }
    });
}

// ---------------------------------------------------------------- entry

template <int FMT>
static void linear_kquant_t(void* out, const float* A, int64_t lda, const uint8_t* blocks, const void* bias,
                            int64_t M, int64_t N, int64_t K, int adt) {
    if (Vec::DTILE_R > 0 && M >= QTILE_MIN_M && M <= GEMV_MAX_M) {
        gemv_kquant_tiles<FMT>(out, A, lda, blocks, bias, M, N, K, adt);
        return;
    }
    if (M > QGEMV_MAX_M && M <= QGEMV_PASSES * QGEMV_MAX_M) {  // a wide decode step: GEMV passes of <= 8 rows
        for (int64_t m0 = 0; m0 < M; m0 += QGEMV_MAX_M)
            linear_kquant_t<FMT>((char*)out + m0 * N * dtype_bytes(adt), A + m0 * lda, lda, blocks, bias,
                                 imin(QGEMV_MAX_M, M - m0), N, K, adt);
        return;
    }
    if (M <= QGEMV_MAX_M) {
        switch (M) {
            case 1: gemv_kquant<FMT, 1>(out, A, lda, blocks, bias, N, K, adt); break;
            case 2: gemv_kquant<FMT, 2>(out, A, lda, blocks, bias, N, K, adt); break;
            case 3: gemv_kquant<FMT, 3>(out, A, lda, blocks, bias, N, K, adt); break;
            case 4: gemv_kquant<FMT, 4>(out, A, lda, blocks, bias, N, K, adt); break;
            case 5: gemv_kquant<FMT, 5>(out, A, lda, blocks, bias, N, K, adt); break;
            case 6: gemv_kquant<FMT, 6>(out, A, lda, blocks, bias, N, K, adt); break;
            case 7: gemv_kquant<FMT, 7>(out, A, lda, blocks, bias, N, K, adt); break;
            default: gemv_kquant<FMT, 8>(out, A, lda, blocks, bias, N, K, adt); break;
        }
        return;
    }
    static_assert(KC % QK_K == 0, "a GEMM k-block is whole super-blocks");
    const int64_t bb = kquant_block_bytes(FMT), row_bytes = K / QK_K * bb;
    const float* f16 = f16_table();
    // dequantize a [32 rows][kc] tile into the k-major [kc][32] block the micro-kernel reads
    auto block = [&](int64_t p, int64_t k0, int64_t kc, int thread) -> const float* {
        float* buf = scratch(thread, 2, (size_t)(KC * PANEL));
        alignas(64) float tmp[QK_K];
        for (int64_t j = 0; j < PANEL; ++j) {
            int64_t n = p * PANEL + j;
            if (n >= N) {
                for (int64_t k = 0; k < kc; ++k) buf[k * PANEL + j] = 0.f;
                continue;
            }
            const uint8_t* row = blocks + n * row_bytes;
            for (int64_t kb = 0; kb < kc; kb += QK_K) {
                kq_dequant<FMT>(tmp, row + (k0 + kb) / QK_K * bb, f16);
                for (int i = 0; i < QK_K; ++i) buf[(kb + i) * PANEL + j] = tmp[i];
            }
        }
        return buf;
    };
    gemm(out, A, lda, bias, M, N, K, adt, block);
}
