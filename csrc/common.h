// Shared declarations of the cpu backend's kernels: dtypes, scalar fp16/bf16 conversions,
// the per-ISA kernel table, the thread pool and scratch buffers.
//
// Plain C++ (no pybind11, no libtorch). Tensors arrive as raw pointers + sizes + strides
// counted in elements; every input was validated in Python (portinfer/backends/cpu.py).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>  // std::integral_constant (kernels_impl.h: tile_dispatch)
#include <vector>

enum DType : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
// GGUF block formats of 32 weights; the K-quants (super-blocks of 256 weights) only as the int8
// route's repacked panels (int8.h), which hold them per 32 weights too
enum QFormat : int { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q6_K = 3, Q4_K = 4, Q5_K = 5 };
// how linear's weights are stored: dense panels (pack_dense) of a dtype, or GGUF blocks
enum WeightFormat : int { W_F32 = 0, W_F16 = 1, W_BF16 = 2, W_Q8_0 = 3, W_Q4_0 = 4, W_Q4_1 = 5,
                          W_Q4_K = 6, W_Q5_K = 7, W_Q6_K = 8 };  // K-quants: kquant_impl.h
// W_INT8 + QFormat: GGUF blocks repacked in panels of 16 rows for the int8 route (int8.h); the
// kernel table's linear takes them for prefill (M > 16) on fp32 activations, embedding gathers rows
// out of them
enum : int { W_INT8 = 16 };

// GGUF block sizes (spec.QUANT_FORMATS): 32 weights per block
static const int QK = 32;
static constexpr int64_t quant_block_bytes(int fmt) { return fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : 20; }
// K-quant super-blocks (spec.QUANT_FORMATS): 256 weights, 144 / 176 / 210 bytes
static const int QK_K = 256;
static constexpr int64_t kquant_block_bytes(int wfmt) { return wfmt == W_Q4_K ? 144 : wfmt == W_Q5_K ? 176 : 210; }
// the 256 unsigned codes of a K-quant super-block b, in weight order (layouts in kquant_impl.h):
// Q4_K / Q5_K: sub-block s (32 weights) = low (s even) / high (s odd) nibbles of qs[32 (s / 2) ..],
// Q5_K's fifth bit of weight l of sub-block s = bit s of qh[l]; Q6_K: weight i = 128 h + 32 Q + l,
// low 4 bits = nibble Q / 2 of ql[64 h + 32 (Q % 2) + l], high 2 bits = bits 2 Q.. of qh[32 h + l]
static inline void kquant_codes(uint8_t* u, const uint8_t* b, int wfmt) {
    if (wfmt == W_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        for (int i = 0; i < 256; ++i) {
            const int h = i / 128, q = (i % 128) / 32, l = i % 32;
            const int lo = (ql[64 * h + 32 * (q % 2) + l] >> (4 * (q / 2))) & 0x0F;
            u[i] = (uint8_t)(lo | (((qh[32 * h + l] >> (2 * q)) & 3) << 4));
        }
        return;
    }
    const uint8_t *qh = b + 16, *qs = b + 16 + (wfmt == W_Q5_K ? 32 : 0);
    for (int s = 0; s < 8; ++s)
        for (int l = 0; l < 32; ++l) {
            int q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0x0F;
            if (wfmt == W_Q5_K) q |= ((qh[l] >> s) & 1) << 4;
            u[32 * s + l] = (uint8_t)q;
        }
}

// scale sc and min m (6 bits each) of sub-block j (< 8) of a Q4_K / Q5_K super-block, from its 12
// packed bytes s (ggml's get_scale_min_k4)
static inline void kquant_scale_min(const uint8_t* s, int j, int* sc, int* m) {
    *sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
}

// ----------------------------------------------------------------------------
// scalar conversions (round to nearest even, NaN stays NaN)

static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
        float v = (float)mant * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
    return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | 0x7c00 | (x > 0x7f800000u ? 0x200 : 0);  // Inf / NaN
    if (x >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to Inf
    if (x < 0x38800000u) {  // below 2^-14: subnormal half, v * 2^24 rounded to an integer
        float v = bits_to_f32(x) * 16777216.0f;
        return sign | (uint16_t)std::nearbyint(v);
    }
    uint32_t r = x - 0x38000000u;  // rebias exponent 127 -> 15
    r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    return sign | (uint16_t)r;
}

static inline float load_scalar(const void* p, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_F16) return f16_to_f32(((const uint16_t*)p)[i]);
    return bf16_to_f32(((const uint16_t*)p)[i]);
}

static inline void store_scalar(void* p, int dt, int64_t i, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else if (dt == DT_F16) ((uint16_t*)p)[i] = f32_to_f16(v);
    else ((uint16_t*)p)[i] = f32_to_bf16(v);
}

static inline int64_t dtype_bytes(int dt) { return dt == DT_F32 ? 4 : 2; }

// ----------------------------------------------------------------------------
// attention arguments (strides in elements; q/k/v: [B, H, S, D] with unit stride in D)

struct AttentionArgs {
    void* out;  // [B, Hq, Sq, D] contiguous
    const void *q, *k, *v;
    const int32_t *q_pos, *kv_len;  // [B]
    int64_t B, Hq, Hkv, Sq, Sk, D;
    int64_t q_stride[3], k_stride[3], v_stride[3];  // (batch, head, position)
    int causal;
    float scale;
    int dt;    // q and out
    int kvdt;  // k and v (a KV cache's dtype may differ from the activations')
};

// ----------------------------------------------------------------------------
// one table of kernels per compiled instruction set (kernels_<isa>.cpp)

struct KernelTable {
    const char* name;
    // out [M, H] = x [M, H] (row stride xs) normalized * w (+ b)
    void (*rms_norm)(void* out, const void* x, const void* w, int64_t M, int64_t H, int64_t xs, float eps, int dt);
    void (*layer_norm)(void* out, const void* x, const void* w, const void* b, int64_t M, int64_t H, int64_t xs,
                       float eps, int dt);
    // out [M, I] = silu(x[:, :I]) * x[:, I:]; x [M, 2I] row stride xs
    void (*silu_mul)(void* out, const void* x, int64_t M, int64_t I, int64_t xs, int dt);
    // out [M, C] = gelu(x [M, C] row stride xs)
    void (*gelu)(void* out, const void* x, int64_t M, int64_t C, int64_t xs, int tanh_variant, int dt);
    // out [B, H, S, D] contiguous = rope(x [B, H, S, D] strides sb, sh, ss), pos int64 [B, S], inv_freq [rd/2]
    void (*rope)(void* out, const void* x, const int64_t* pos, const double* inv_freq, int64_t B, int64_t H,
                 int64_t S, int64_t D, int64_t rd, int64_t sb, int64_t sh, int64_t ss, int interleaved, int dt);
    // out [M, N] = x [M, K] (row stride xs) @ W^T + bias; W as wfmt says: packed by pack_dense
    // [ceil(N/32)][K][32], or GGUF blocks uint8 [N, K/32 * block_bytes]
    void (*linear)(void* out, const void* x, const void* weights, const void* bias, int64_t M, int64_t N, int64_t K,
                   int64_t xs, int adt, int wfmt);
    void (*attention)(const AttentionArgs* a);
};

// rows of x up to which every path's linear runs its GEMV (decode: a server's step over up to 16
// slots, kernels_impl.h); more rows are a prefill
static const int GEMV_MAX_M = 16;
// whether a bf16 x bf16 GEMM (gemm_bf16.cpp's vdpbf16ps, amx_kernels.cpp's tiles) takes a linear call:
// bf16 activations and weights past the GEMV
static inline bool bf16_gemm_takes(int64_t M, int64_t K, int adt, int wfmt) {
    return wfmt == W_BF16 && adt == DT_BF16 && M > GEMV_MAX_M && K > 0;
}

// dense weights are packed in panels of PANEL output features: [ceil(N/PANEL)][K][PANEL], zero padded
static const int PANEL = 32;
// P [ceil(N/32)][K][32] = W [N, K] (row stride ws elements), padded with zeros; elem_bytes 2 or 4 (layout.cpp)
void pack_dense(void* packed, const void* w, int64_t N, int64_t K, int64_t ws, int64_t elem_bytes);

const KernelTable* table_portable();
#if defined(__x86_64__)
const KernelTable* table_avx2();
const KernelTable* table_avx512();
// the avx512 table whose linear runs bf16 x bf16 GEMMs on vdpbf16ps (gemm_bf16.cpp)
const KernelTable* table_avx512bf16();
// gemm_bf16.cpp's pieces the amx path shares (AVX512-BF16 CPUs only): a [kc][32] block of a bf16
// panel interleaved into k-pairs, dst [ceil(kc/2)][32 outputs][2] (an odd last k paired with zero);
// acc [rows][32] fp32 + bias [n0 ..] stored as bf16 into columns n0 .. n0 + 31 (< N) of y [rows][N]
void bf16_pack_pairs(uint16_t* dst, const uint16_t* src, int64_t kc);
void bf16_store_rows(uint16_t* y, const float* acc, const uint16_t* bias, int64_t rows, int64_t N, int64_t n0);
// vdpbf16ps' register-only ceiling: runs `iters` rounds of 24 chains on every pool thread, returns the flops
double bf16_dot_peak_flops(int64_t iters);
#endif

// every fp16 bit pattern as fp32 (256 KiB, built on first use; layout.cpp): a GGUF block's scale is
// then one load + broadcast instead of three vector shuffles
const float* f16_table();

// ----------------------------------------------------------------------------
// thread pool (threadpool.cpp) and scratch buffers

typedef void (*task_fn)(void* ctx, int64_t task, int thread);
// run fn(ctx, task, thread) for task in [0, n) on the pool; returns when all are done
void parallel_for(int64_t n, task_fn fn, void* ctx);
int pool_threads();
void pool_set_threads(int n);
int default_threads();
// a 64-byte aligned buffer of at least `floats` floats, owned by (thread, slot); valid until the
// next request for the same (thread, slot) with a larger size
float* scratch(int thread, int slot, size_t floats);
