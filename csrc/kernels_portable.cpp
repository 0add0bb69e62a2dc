// The portable kernel set: no instruction-set extension beyond the compiler's baseline
// (SSE2 on x86-64, NEON on aarch64, which -O3 uses by auto-vectorizing these 8-wide loops).
// It is the fallback on any CPU and the path `PORTINFER_CPU_SIMD=portable` forces.
#include "common.h"
#include "int8.h"  // the int8 route's repacked panels, which linear also reads (linear_repacked_t)

namespace pi_portable {

struct Vec {
    struct V { float x[8]; };
    static const int W = 8;
    static const int GEMM_MR = 2;
    static const int GEMV_R = 4;  // rows of x per dense GEMV pass (kernels_impl.h)
    static const int DTILE_R = 0;  // rows of x per tile of dequantized weight rows (kernels_impl.h; 0: off)
    static const bool NIBBLE_LUT = false;  // no 16-entry permute: Q4 goes through int -> float conversions
    static inline V zero() { V r; for (int i = 0; i < W; ++i) r.x[i] = 0.f; return r; }
    static inline V set1(float a) { V r; for (int i = 0; i < W; ++i) r.x[i] = a; return r; }
    static inline V load(const float* p) { V r; std::memcpy(r.x, p, sizeof(r.x)); return r; }
    static inline void store(float* p, V a) { std::memcpy(p, a.x, sizeof(a.x)); }
    static inline V add(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] += b.x[i]; return a; }
    static inline V sub(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] -= b.x[i]; return a; }
    static inline V mul(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] *= b.x[i]; return a; }
    static inline V div(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] /= b.x[i]; return a; }
    static inline V max(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i]; return a; }
    static inline V fma(V a, V b, V c) { for (int i = 0; i < W; ++i) c.x[i] += a.x[i] * b.x[i]; return c; }
    static inline float reduce_add(V a) {
        return ((a.x[0] + a.x[4]) + (a.x[1] + a.x[5])) + ((a.x[2] + a.x[6]) + (a.x[3] + a.x[7]));
    }
    static inline float reduce_max(V a) { float m = a.x[0]; for (int i = 1; i < W; ++i) m = a.x[i] > m ? a.x[i] : m; return m; }
    static inline V load_f16(const uint16_t* p) { V r; for (int i = 0; i < W; ++i) r.x[i] = f16_to_f32(p[i]); return r; }
    static inline V load_bf16(const uint16_t* p) { V r; for (int i = 0; i < W; ++i) r.x[i] = bf16_to_f32(p[i]); return r; }
    static inline void store_f16(uint16_t* p, V a) { for (int i = 0; i < W; ++i) p[i] = f32_to_f16(a.x[i]); }
    static inline void store_bf16(uint16_t* p, V a) { for (int i = 0; i < W; ++i) p[i] = f32_to_bf16(a.x[i]); }
    // the fp16 scalar at p (a GGUF block's scale), unaligned
    static inline float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return f16_to_f32(h); }
    static inline V load_i8(const int8_t* p) { V r; for (int i = 0; i < W; ++i) r.x[i] = (float)p[i]; return r; }
    static inline V iota(float) { return zero(); }  // used only where NIBBLE_LUT
    static inline void nibbles_lut(const uint8_t*, V, V&, V&) {}
    // float((p[i] >> shift) & mask) for i < W (K-quants' high bits: kquant_impl.h)
    static inline V bits(const uint8_t* p, int shift, int mask) {
        V r; for (int i = 0; i < W; ++i) r.x[i] = (float)((p[i] >> shift) & mask); return r;
    }
    // the W low and W high nibbles of p[0..W) as floats, plus offset
    static inline void nibbles(const uint8_t* p, float offset, V& lo, V& hi) {
        for (int i = 0; i < W; ++i) { lo.x[i] = (float)(p[i] & 15) + offset; hi.x[i] = (float)(p[i] >> 4) + offset; }
    }
    static inline void transpose(V* r) {  // r[0..7] (8 rows of 8) := its transpose
        for (int i = 0; i < W; ++i)
            for (int j = i + 1; j < W; ++j) { float t = r[i].x[j]; r[i].x[j] = r[j].x[i]; r[j].x[i] = t; }
    }
    static inline V abs(V a) { for (int i = 0; i < W; ++i) a.x[i] = std::fabs(a.x[i]); return a; }
    static inline V select_neg(V x, V a, V b) {  // a where x's sign bit is set, else b
        for (int i = 0; i < W; ++i) b.x[i] = std::signbit(x.x[i]) ? a.x[i] : b.x[i];
        return b;
    }
    static inline V min(V a, V b) { for (int i = 0; i < W; ++i) a.x[i] = a.x[i] < b.x[i] ? a.x[i] : b.x[i]; return a; }
    static inline V round(V a) { for (int i = 0; i < W; ++i) a.x[i] = std::nearbyint(a.x[i]); return a; }
    static inline V scale_pow2(V p, V n) { for (int i = 0; i < W; ++i) p.x[i] = std::ldexp(p.x[i], (int)n.x[i]); return p; }
    static inline V zero_below(V x, float lo, V y) { for (int i = 0; i < W; ++i) y.x[i] = x.x[i] < lo ? 0.f : y.x[i]; return y; }
};

#include "kernels_impl.h"

}  // namespace pi_portable

const KernelTable* table_portable() { return &pi_portable::table; }
