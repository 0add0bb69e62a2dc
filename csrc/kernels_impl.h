// The kernels, written once over a vector type `Vec` (W fp32 lanes) and compiled once per
// instruction set: kernels_<isa>.cpp defines `Vec` in its own namespace and includes this file
// there. Plain C++: raw pointers, sizes and strides in elements, fp32 accumulation.
//
// Not a standalone header: no include guard, no includes (they come before the namespace).

typedef Vec::V V;
static const int W = Vec::W;

// exp(x) for every lane: Cephes' expf (2^n * p(r), about 1 ulp), 0 below -87.3 (the true value
// is < 1.2e-38), the same polynomial on every path
static inline V vexp(V x) {
    const float lo = -87.3f;
    V c = Vec::min(Vec::max(x, Vec::set1(lo)), Vec::set1(88.3f));
    V n = Vec::round(Vec::mul(c, Vec::set1(1.44269504088896341f)));
    V r = Vec::fma(n, Vec::set1(-0.693359375f), c);
    r = Vec::fma(n, Vec::set1(2.12194440e-4f), r);
    V p = Vec::set1(1.9875691500E-4f);
    p = Vec::fma(p, r, Vec::set1(1.3981999507E-3f));
    p = Vec::fma(p, r, Vec::set1(8.3334519073E-3f));
    p = Vec::fma(p, r, Vec::set1(4.1665795894E-2f));
    p = Vec::fma(p, r, Vec::set1(1.6666665459E-1f));
    p = Vec::fma(p, r, Vec::set1(5.0000001201E-1f));
    p = Vec::fma(p, Vec::mul(r, r), Vec::add(r, Vec::set1(1.0f)));
    return Vec::zero_below(x, lo, Vec::scale_pow2(p, n));
}

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ============================================================================
// loads and stores of W elements of any activation dtype, as fp32

static inline V load_dt(const void* p, int dt, int64_t i) {
    if (dt == DT_F32) return Vec::load((const float*)p + i);
    if (dt == DT_F16) return Vec::load_f16((const uint16_t*)p + i);
    return Vec::load_bf16((const uint16_t*)p + i);
}

// the first n < W elements, the rest zero
static inline V load_dt_part(const void* p, int dt, int64_t i, int64_t n) {
    alignas(64) float t[W];
    for (int j = 0; j < W; ++j) t[j] = j < n ? load_scalar(p, dt, i + j) : 0.f;
    return Vec::load(t);
}

static inline void store_dt(void* p, int dt, int64_t i, V v) {
    if (dt == DT_F32) { Vec::store((float*)p + i, v); return; }
    if (dt == DT_F16) { Vec::store_f16((uint16_t*)p + i, v); return; }
    Vec::store_bf16((uint16_t*)p + i, v);
}

static inline void store_dt_part(void* p, int dt, int64_t i, V v, int64_t n) {
    alignas(64) float t[W];
    Vec::store(t, v);
    for (int64_t j = 0; j < n; ++j) store_scalar(p, dt, i + j, t[j]);
}

// dst [n] fp32 = src [n] of dtype dt
static void row_to_f32(float* dst, const void* src, int dt, int64_t n) {
    if (dt == DT_F32) { std::memcpy(dst, src, (size_t)n * 4); return; }
    int64_t i = 0;
    for (; i + W <= n; i += W) Vec::store(dst + i, load_dt(src, dt, i));
    for (; i < n; ++i) dst[i] = load_scalar(src, dt, i);
}

static inline const char* at(const void* p, int64_t elements, int dt) {
    return (const char*)p + elements * dtype_bytes(dt);
}
static inline char* at(void* p, int64_t elements, int dt) { return (char*)p + elements * dtype_bytes(dt); }

// ============================================================================
// parallel loops on the pool (threadpool.cpp)

template <class F>
static void par(int64_t n, F& f) {
    parallel_for(n, [](void* ctx, int64_t task, int thread) { (*(F*)ctx)(task, thread); }, &f);
}

// f(begin, end, thread) over [0, n) in chunks of at least `grain`
template <class F>
static void par_range(int64_t n, int64_t grain, F f) {
    int64_t chunks = imax(1, imin(ceil_div(n, imax(grain, 1)), 4 * (int64_t)pool_threads()));
    int64_t step = ceil_div(n, chunks);
    auto body = [&](int64_t t, int thread) { f(t * step, imin(n, (t + 1) * step), thread); };
    par(ceil_div(n, step), body);
}

// rows per task so that a task touches ~16K elements
static inline int64_t row_grain(int64_t cols) { return imax(1, 16384 / imax(cols, 1)); }

// ============================================================================
// norms

// layer_norm (center: the mean is subtracted, then + b) and rms_norm (no centering, b unused)
static void norm(void* out, const void* x, const void* w, const void* b, int64_t M, int64_t H, int64_t xs, float eps,
                 int dt, bool center) {
    par_range(M, row_grain(H), [&](int64_t m0, int64_t m1, int) {
        for (int64_t m = m0; m < m1; ++m) {
            const char* xr = at(x, m * xs, dt);
            char* yr = at(out, m * H, dt);
            float mean = 0.f;
            int64_t i;
            if (center) {
                V acc = Vec::zero();
                for (i = 0; i + W <= H; i += W) acc = Vec::add(acc, load_dt(xr, dt, i));
                if (i < H) acc = Vec::add(acc, load_dt_part(xr, dt, i, H - i));
                mean = Vec::reduce_add(acc) / (float)H;
            }
            // second pass over e = x - mean: the variance of e does not cancel when |mean| >> std, and
            // sum(e) / H corrects the fp32-rounded mean (when x - mean nearly cancels, as for H = 2,
            // the mean's rounding error would otherwise dominate); var = mean(e^2) - corr^2
            V mv = Vec::set1(mean), acc = Vec::zero(), acc_e = Vec::zero();
            for (i = 0; i + W <= H; i += W) {
                V e = Vec::sub(load_dt(xr, dt, i), mv);
                acc = Vec::fma(e, e, acc);
                acc_e = Vec::add(acc_e, e);
            }
            float tail = 0.f, tail_e = 0.f;
            for (; i < H; ++i) {
                float e = load_scalar(xr, dt, i) - mean;
                tail += e * e;
                tail_e += e;
            }
            const float corr = center ? (Vec::reduce_add(acc_e) + tail_e) / (float)H : 0.f;
            const float var = (Vec::reduce_add(acc) + tail) / (float)H - corr * corr;
            V r = Vec::set1(1.0f / std::sqrt(var + eps)), cv = Vec::set1(corr);
            for (i = 0; i < H; i += W) {
                int64_t n = imin(W, H - i);
                V e = Vec::sub(Vec::sub(n == W ? load_dt(xr, dt, i) : load_dt_part(xr, dt, i, n), mv), cv);
                V y = Vec::mul(Vec::mul(e, r), n == W ? load_dt(w, dt, i) : load_dt_part(w, dt, i, n));
                if (center) y = Vec::add(y, n == W ? load_dt(b, dt, i) : load_dt_part(b, dt, i, n));
                if (n == W) store_dt(yr, dt, i, y);
                else store_dt_part(yr, dt, i, y, n);
            }
        }
    });
}

static void rms_norm(void* out, const void* x, const void* w, int64_t M, int64_t H, int64_t xs, float eps, int dt) {
    norm(out, x, w, nullptr, M, H, xs, eps, dt, false);
}

static void layer_norm(void* out, const void* x, const void* w, const void* b, int64_t M, int64_t H, int64_t xs,
                       float eps, int dt) {
    norm(out, x, w, b, M, H, xs, eps, dt, true);
}

// ============================================================================
// elementwise: silu_mul, gelu, rope

static inline V silu_times(V g, V u) {
    V one = Vec::set1(1.0f);
    V e = vexp(Vec::sub(Vec::zero(), g));
    return Vec::mul(Vec::div(g, Vec::add(one, e)), u);
}

static void silu_mul(void* out, const void* x, int64_t M, int64_t I, int64_t xs, int dt) {
    par_range(M, row_grain(I), [&](int64_t m0, int64_t m1, int) {
        for (int64_t m = m0; m < m1; ++m) {
            const char* gate = at(x, m * xs, dt);
            const char* up = at(x, m * xs + I, dt);
            char* yr = at(out, m * I, dt);
            int64_t i = 0;
            for (; i + W <= I; i += W) store_dt(yr, dt, i, silu_times(load_dt(gate, dt, i), load_dt(up, dt, i)));
            if (i < I) store_dt_part(yr, dt, i, silu_times(load_dt_part(gate, dt, i, I - i), load_dt_part(up, dt, i, I - i)), I - i);
        }
    });
}

// gelu(x) = x * Phi(x), Phi(x) = 0.5 * erfc(-x / sqrt2). With a = |x| and e = 0.5 * erfc(a / sqrt2):
// Phi = e for x < 0 and 1 - e otherwise, so nothing cancels (1 + erf(x / sqrt2) would lose all
// relative accuracy as x -> -inf). erfc(a / sqrt2) = exp(-a^2 / 2) * t * P(t), t = 1 / (1 + 0.375 a):
// P (degree 9) fitted to erfc * exp in relative error on a in [0, 13] (erfc below 1e-38 past it);
// a^2 / 2 split into hi + lo (exact by fma) so the exp factor is off by one exp rounding only.
// erfc is within ~6 ulp relative, gelu within ~3 ulp of |x| (measured against float64 erf).
static inline V gelu_erf(V x) {
    static const float P[10] = {4.398408160e-02f, -2.794971466e-01f, 7.157318592e-01f, -8.813458085e-01f,
                                4.575436413e-01f, -1.257330477e-01f, 2.205715775e-01f, 2.496991158e-01f,
                                2.998640537e-01f, 2.991816401e-01f};
    V a = Vec::min(Vec::abs(x), Vec::set1(13.0f));
    V t = Vec::div(Vec::set1(1.0f), Vec::fma(a, Vec::set1(0.375f), Vec::set1(1.0f)));
    V p = Vec::set1(P[0]);
#pragma GCC unroll 10
    for (int i = 1; i < 10; ++i) p = Vec::fma(p, t, Vec::set1(P[i]));
    V hi = Vec::mul(Vec::mul(a, a), Vec::set1(0.5f));
    V lo = Vec::mul(Vec::fma(a, a, Vec::mul(hi, Vec::set1(-2.0f))), Vec::set1(0.5f));  // a^2 / 2 - hi, exact
    V ex = vexp(Vec::sub(Vec::zero(), hi));
    ex = Vec::fma(Vec::sub(Vec::zero(), ex), lo, ex);  // exp(-hi - lo) = exp(-hi) * (1 - lo)
    V e = Vec::mul(Vec::mul(Vec::mul(t, p), ex), Vec::set1(0.5f));
    return Vec::mul(x, Vec::select_neg(x, e, Vec::sub(Vec::set1(1.0f), e)));
}

// the tanh form: 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)), z = sqrt(2/pi) (x + 0.044715 x^3); no
// cancellation for x < 0 either (exp(-2z) is large there and the quotient keeps its relative accuracy)
static inline V gelu_tanh(V x) {
    const float k1 = -2.0f * 0.7978845608028654f, k3 = -2.0f * 0.7978845608028654f * 0.044715f;
    V m2z = Vec::mul(x, Vec::fma(Vec::mul(x, x), Vec::set1(k3), Vec::set1(k1)));
    return Vec::div(x, Vec::add(Vec::set1(1.0f), vexp(m2z)));
}

template <bool TANH>
static inline V gelu_v(V x) { return TANH ? gelu_tanh(x) : gelu_erf(x); }

template <bool TANH>
static void gelu_t(void* out, const void* x, int64_t M, int64_t C, int64_t xs, int dt) {
    par_range(M, row_grain(C), [&](int64_t m0, int64_t m1, int) {
        for (int64_t m = m0; m < m1; ++m) {
            const char* xr = at(x, m * xs, dt);
            char* yr = at(out, m * C, dt);
            int64_t i = 0;
            for (; i + W <= C; i += W) store_dt(yr, dt, i, gelu_v<TANH>(load_dt(xr, dt, i)));
            if (i < C) store_dt_part(yr, dt, i, gelu_v<TANH>(load_dt_part(xr, dt, i, C - i)), C - i);
        }
    });
}

static void gelu(void* out, const void* x, int64_t M, int64_t C, int64_t xs, int tanh_variant, int dt) {
    if (tanh_variant) gelu_t<true>(out, x, M, C, xs, dt);
    else gelu_t<false>(out, x, M, C, xs, dt);
}

// cos | sin [T][rd] of every (position, frequency) pair of the last rope call, kept for the next one:
// every rope of a step (q and k of every layer) sees the same positions and frequencies, and the
// float64 cos and sin of a position cost ~20x rotating it (a decode step of 8 sequences spent 2% of
// its time there, a 128-token prefill ~8%). Keyed by the values themselves (positions and
// frequencies compared in full, never pointers), so a new step, model or buffer recomputes. One
// table per instruction-set path; callers hold kernel_lock, so one call at a time uses it.
struct RopeAngles {
    std::vector<int64_t> pos;
    std::vector<double> freq;
    std::vector<float> cs;
};

static const float* rope_angles(const int64_t* pos, const double* inv_freq, int64_t T, int64_t half) {
    static RopeAngles last;
    if ((int64_t)last.pos.size() == T && (int64_t)last.freq.size() == half &&
        std::memcmp(last.pos.data(), pos, (size_t)T * sizeof(int64_t)) == 0 &&
        std::memcmp(last.freq.data(), inv_freq, (size_t)half * sizeof(double)) == 0)
        return last.cs.data();
    last.pos.assign(pos, pos + T);
    last.freq.assign(inv_freq, inv_freq + half);
    last.cs.resize((size_t)(T * 2 * half));
    float* cs = last.cs.data();
    par_range(T, imax(1, 256 / imax(half, 1)), [&](int64_t t0, int64_t t1, int) {
        for (int64_t t = t0; t < t1; ++t)
            // the angle in float64: pos * inv_freq grows with position, an fp32 angle would be off by ~pos * 2^-24
            for (int64_t i = 0; i < half; ++i) {
                double a = (double)pos[t] * inv_freq[i];
                cs[t * 2 * half + i] = (float)std::cos(a);
                cs[t * 2 * half + half + i] = (float)std::sin(a);
            }
    });
    return cs;
}

static void rope(void* out, const void* x, const int64_t* pos, const double* inv_freq, int64_t B, int64_t H,
                 int64_t S, int64_t D, int64_t rd, int64_t sb, int64_t sh, int64_t ss, int interleaved, int dt) {
    const int64_t half = rd / 2;
    const float* angles = rope_angles(pos, inv_freq, B * S, half);
    par_range(B * S, imax(1, 4096 / imax(H * D, 1)), [&](int64_t t0, int64_t t1, int) {
        for (int64_t t = t0; t < t1; ++t) {
            int64_t b = t / S, s = t % S;
            const float* cs = angles + t * 2 * half;
            for (int64_t h = 0; h < H; ++h) {
                const char* xr = at(x, b * sb + h * sh + s * ss, dt);
                char* yr = at(out, ((b * H + h) * S + s) * D, dt);
                if (dt == DT_F32 && !interleaved) {  // the common case, in a loop the compiler vectorizes
                    const float* xf = (const float*)xr;
                    float* yf = (float*)yr;
                    for (int64_t i = 0; i < half; ++i) {
                        float x1 = xf[i], x2 = xf[half + i], c = cs[i], sn = cs[half + i];
                        yf[i] = x1 * c - x2 * sn;
                        yf[half + i] = x2 * c + x1 * sn;
                    }
                } else {
                    for (int64_t i = 0; i < half; ++i) {
                        int64_t i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
                        float x1 = load_scalar(xr, dt, i1), x2 = load_scalar(xr, dt, i2);
                        float c = cs[i], sn = cs[half + i];
                        store_scalar(yr, dt, i1, x1 * c - x2 * sn);
                        store_scalar(yr, dt, i2, x2 * c + x1 * sn);
                    }
                }
                std::memcpy(yr + rd * dtype_bytes(dt), xr + rd * dtype_bytes(dt), (size_t)((D - rd) * dtype_bytes(dt)));
            }
        }
    });
}

// ============================================================================
// linear: y [M, N] = x [M, K] W^T + b
//
// Dense W is packed at prepare time in panels of PANEL = 32 output features, k-major:
// P [ceil(N/32)][K][32] (pack_dense in bindings.cpp). Quantized W stays GGUF blocks [N][K/32].
// M <= GEMV_MAX_M (decode, a server's step over up to 16 slots): each weight vector loaded once per
// pass and used against GEMV_R rows of x (as many as the registers hold); more rows take further
// passes over the same panel while it is in L2 (K in chunks of GEMV_KC), so the weights are read from
// memory once per call. Larger M: a GEMM over KC x 32 weight blocks (converted / dequantized to fp32
// when needed) with an MR x 32 register-tile micro-kernel.

static const int NV = PANEL / W;  // vectors per panel row
static const int GEMV_R = Vec::GEMV_R;
static const int64_t GEMV_KC = 1024;  // k per chunk when a panel takes several passes (128 KiB of fp32)
// block-quantized weights: rows of x per GEMV pass (decode of up to 8 sequences reads the weights
// once; the GEMM path dequantizes every tile, which cost a batch of 8 ~4x one sequence)
static const int QGEMV_MAX_M = 8;
// up to this many GEMV passes (M <= 16: a server's decode step over 16 slots) before the GEMM path,
// whose per-tile dequantization cost a step of 16 rows ~4x one (the passes: ~2x)
static const int QGEMV_PASSES = 2;
static const int64_t KC = 256;  // k per GEMM block: a 256 x 32 fp32 block is 32 KiB (L1)
static const int MR = Vec::GEMM_MR;
static const int64_t MC_MAX = 1024;  // rows per GEMM task at most (a 1024 x 32 fp32 tile: 128 KiB, L2)

// x as fp32 rows: x itself or a converted copy (thread 0's slot 1, filled before any task runs).
// Rows whose stride is a multiple of 4 KiB all fall in one L1 set, and the GEMM's register tile
// reads 12 of them at once (4K aliasing): past the GEMV such an x is copied with a padded stride,
// and a converted copy is always padded so
static const float* x_as_f32(const void* x, int64_t M, int64_t K, int64_t xs, int adt, int64_t* lda) {
    const bool aliased = (xs * 4) % 4096 == 0 && M > GEMV_MAX_M;
    if (adt == DT_F32 && !aliased) { *lda = xs; return (const float*)x; }
    const int64_t ld = (K * 4) % 4096 == 0 ? K + 16 : K;
    float* buf = scratch(0, 1, (size_t)(M * ld));
    for (int64_t m = 0; m < M; ++m) row_to_f32(buf + m * ld, at(x, m * xs, adt), adt, K);
    *lda = ld;
    return buf;
}

// y[m, n0 : n0 + n] = acc[m, :n] + bias
static inline void write_out(void* out, int adt, const float* acc, int64_t acc_stride, int64_t rows, int64_t N,
                             int64_t n0, int64_t n, const void* bias) {
    for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < n; ++j) {
            float v = acc[m * acc_stride + j];
            if (bias) v += load_scalar(bias, adt, n0 + j);
            store_scalar(out, adt, m * N + n0 + j, v);
        }
}

// c [R][NVEC vectors] += A [R rows, stride lda][kc] x B [kc rows, stride ldb][NVEC * W]: a register
// tile, one broadcast of A per row and k, one load of B per vector and k (the GEMM micro-kernel
// and attention's scores)
template <int R, int NVEC>
static inline void tile_fma(V (&c)[R][NVEC], const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kc) {
    for (int64_t k = 0; k < kc; ++k) {
        V b[NVEC];
#pragma GCC unroll 8
        for (int v = 0; v < NVEC; ++v) b[v] = Vec::load(B + k * ldb + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            V a = Vec::set1(A[r * lda + k]);
#pragma GCC unroll 8
            for (int v = 0; v < NVEC; ++v) c[r][v] = Vec::fma(a, b[v], c[r][v]);
        }
    }
}

// acc [R][32] (+)= A [R rows, lda][kc] x B [kc][32]
template <int R>
static inline void micro_kernel(float* acc, const float* A, int64_t lda, const float* B, int64_t kc, bool init) {
    V c[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[r][v] = init ? Vec::zero() : Vec::load(acc + r * PANEL + v * W);
    tile_fma<R, NV>(c, A, lda, B, PANEL, kc);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) Vec::store(acc + r * PANEL + v * W, c[r][v]);
}

template <int R>
static inline void micro_dispatch(int r, float* acc, const float* A, int64_t lda, const float* B, int64_t kc, bool init) {
    if (r == R) micro_kernel<R>(acc, A, lda, B, kc, init);
    else if constexpr (R > 1) micro_dispatch<R - 1>(r, acc, A, lda, B, kc, init);
}

// GEMM over panels; block(panel, k0, kc, thread) returns the fp32 [kc][32] weight block.
// A task is (panel, chunk of rows). Rows are only chunked when there are too few panels to
// keep the threads busy: each weight block is then converted / dequantized once, not per chunk.
template <class Block>
static void gemm(void* out, const float* A, int64_t lda, const void* bias, int64_t M, int64_t N, int64_t K, int adt,
                 Block& block) {
    const int64_t panels = ceil_div(N, PANEL), threads = pool_threads();
    int64_t mc = imin(M, MC_MAX);
    if (panels < 2 * threads) mc = imin(mc, imax(MR, ceil_div(ceil_div(M, ceil_div(2 * threads, panels)), MR) * MR));
    const int64_t mchunks = ceil_div(M, mc);
    auto task = [&](int64_t t, int thread) {
        int64_t p = t / mchunks, m0 = (t % mchunks) * mc, m1 = imin(M, m0 + mc);
        float* acc = scratch(thread, 3, (size_t)(mc * PANEL));
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            int64_t kc = imin(KC, K - k0);
            const float* B = block(p, k0, kc, thread);
            for (int64_t m = m0; m < m1; m += MR)
                micro_dispatch<MR>((int)imin(MR, m1 - m), acc + (m - m0) * PANEL, A + m * lda + k0, lda, B, kc, k0 == 0);
        }
        int64_t n0 = p * PANEL;
        write_out(at(out, m0 * N, adt), adt, acc, PANEL, m1 - m0, N, n0, imin(PANEL, N - n0), bias);
    };
    par(panels * mchunks, task);
}

// ---------------------------------------------------------------- dense weights

// acc [R][32] (+)= A [R rows, lda][k0, k1) x P's rows k0..k1 (a panel, k-major [K][32] of WDT).
// Few rows: two accumulator sets (even / odd k) so the FMA chains overlap; more rows (R x NV > 8
// accumulators) are enough independent chains with one set.
template <int WDT, int R>
static void gemv_dense_panel(float* acc, const float* A, int64_t lda, const void* P, int64_t k0, int64_t k1,
                             bool init) {
    constexpr bool DUAL = R * NV <= 8;
    V c0[R][NV], c1[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) {
            c0[r][v] = init ? Vec::zero() : Vec::load(acc + r * PANEL + v * W);
            c1[r][v] = Vec::zero();
        }
    int64_t k = k0;
    for (; k + 2 <= k1; k += 2) {
        if (WDT != DT_F32) {  // 16-bit weights: prefetch 8 KiB ahead (4 KiB: +40% from DRAM here; 8 KiB over 4
            // 1.03-1.06x, 16 KiB as 8; fp32 loses with it, or gains nothing at 16 KiB)
            __builtin_prefetch((const char*)P + (k + 128) * PANEL * 2);
            __builtin_prefetch((const char*)P + (k + 128) * PANEL * 2 + 64);
        }
        V w0[NV], w1[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
            w0[v] = load_dt(P, WDT, k * PANEL + v * W);
            w1[v] = load_dt(P, WDT, (k + 1) * PANEL + v * W);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            V a0 = Vec::set1(A[r * lda + k]), a1 = Vec::set1(A[r * lda + k + 1]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) {
                c0[r][v] = Vec::fma(a0, w0[v], c0[r][v]);
                if (DUAL) c1[r][v] = Vec::fma(a1, w1[v], c1[r][v]);
                else c0[r][v] = Vec::fma(a1, w1[v], c0[r][v]);
            }
        }
    }
    if (k < k1)
        for (int r = 0; r < R; ++r) {
            V a = Vec::set1(A[r * lda + k]);
            for (int v = 0; v < NV; ++v) c0[r][v] = Vec::fma(a, load_dt(P, WDT, k * PANEL + v * W), c0[r][v]);
        }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v)
            Vec::store(acc + r * PANEL + v * W, DUAL ? Vec::add(c0[r][v], c1[r][v]) : c0[r][v]);
}

template <int WDT, int R>
static inline void gemv_dense_dispatch(int r, float* acc, const float* A, int64_t lda, const void* P, int64_t k0,
                                       int64_t k1, bool init) {
    if (r == R) gemv_dense_panel<WDT, R>(acc, A, lda, P, k0, k1, init);
    else if constexpr (R > 1) gemv_dense_dispatch<WDT, R - 1>(r, acc, A, lda, P, k0, k1, init);
}

template <int WDT>
static void linear_dense_t(void* out, const float* A, int64_t lda, const void* packed, const void* bias, int64_t M,
                           int64_t N, int64_t K, int adt) {
    const int64_t panels = ceil_div(N, PANEL);
    const int64_t panel_elems = K * PANEL;
    if (M <= GEMV_MAX_M) {
        // contiguous runs of panels, 2 per thread (as the int8 route's decode): a thread streams one
        // region; one panel a task made the threads' streams alternate panel by panel. One linear
        // from memory, 2 threads, f16, Qwen2-0.5B's 4864x896 / 896x4864 / 151936x896 (the head),
        // builds alternated in one process: 1.05-1.5x with the prefetch distance below.
        // Rows past GEMV_R: passes of equal sizes over each chunk of the panel (L2 after the first)
        const int64_t per = imax(1, ceil_div(panels, 2 * (int64_t)pool_threads()));
        const int64_t passes = ceil_div(M, GEMV_R), kc = passes > 1 ? GEMV_KC : K;
        auto task = [&](int64_t t, int) {
            for (int64_t p = t * per; p < imin(panels, (t + 1) * per); ++p) {
                alignas(64) float acc[GEMV_MAX_M * PANEL];
                const char* P = at(packed, p * panel_elems, WDT);
                for (int64_t k0 = 0; k0 < K; k0 += kc)
                    for (int64_t pass = 0; pass < passes; ++pass) {
                        const int64_t m0 = pass * M / passes, rows = (pass + 1) * M / passes - m0;
                        gemv_dense_dispatch<WDT, GEMV_R>((int)rows, acc + m0 * PANEL, A + m0 * lda, lda, P, k0,
                                                         imin(K, k0 + kc), k0 == 0);
                    }
                const int64_t n0 = p * PANEL;
                write_out(out, adt, acc, PANEL, M, N, n0, imin(PANEL, N - n0), bias);
            }
        };
        par(ceil_div(panels, per), task);
        return;
    }
    auto block = [&](int64_t p, int64_t k0, int64_t kc, int thread) -> const float* {
        const char* src = at(packed, p * panel_elems + k0 * PANEL, WDT);
        if (WDT == DT_F32) return (const float*)src;
        float* buf = scratch(thread, 2, (size_t)(KC * PANEL));
        row_to_f32(buf, src, WDT, kc * PANEL);
        return buf;
    };
    gemm(out, A, lda, bias, M, N, K, adt, block);
}

// ---------------------------------------------------------------- GGUF block weights

// the 32 weights of one block as NV vectors (exact in fp32: d * q needs at most 11 + 8 bits)
template <int FMT>
static inline void dequant_block(V* w, const uint8_t* blk) {
    V d = Vec::set1(Vec::half(blk));
    if (FMT == Q8_0) {
        const int8_t* q = (const int8_t*)(blk + 2);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) w[v] = Vec::mul(Vec::load_i8(q + v * W), d);
    } else if (FMT == Q4_0) {
        // low nibbles are weights 0..15, high nibbles 16..31
        const uint8_t* qs = blk + 2;
#pragma GCC unroll 8
        for (int v = 0; v < NV / 2; ++v) {
            V lo, hi;
            Vec::nibbles(qs + v * W, -8.0f, lo, hi);
            w[v] = Vec::mul(lo, d);
            w[NV / 2 + v] = Vec::mul(hi, d);
        }
    } else {
        V m = Vec::set1(Vec::half(blk + 2));
        const uint8_t* qs = blk + 4;
#pragma GCC unroll 8
        for (int v = 0; v < NV / 2; ++v) {
            V lo, hi;
            Vec::nibbles(qs + v * W, 0.0f, lo, hi);
            w[v] = Vec::fma(lo, d, m);
            w[NV / 2 + v] = Vec::fma(hi, d, m);
        }
    }
}

// one block of one weight row against R rows of x (x: the block's 32 columns, row stride lda):
// c[r] += d * (quants [32] . x [32]), and for Q4 cm[r] += m * xs[r * xs_stride] (m: Q4_1's min or
// Q4_0's -8 d; xs: the block's sum of x). The quants become fp32 in registers (unsigned nibbles);
// a block's dot product is scaled once by its d.
template <int FMT, int R>
static inline void quant_block_dot(V* c, float* cm, const float* x, int64_t lda, const float* xs, int64_t xs_stride,
                                   const uint8_t* b, const float* f16) {
    V q[NV];
    if (FMT == Q8_0) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) q[v] = Vec::load_i8((const int8_t*)(b + 2) + v * W);
    } else {
        // Q4_0's -8 is not added to each quant: d * (q - 8) . x = d * (q . x) - 8 d * sum(x), the
        // second term a scalar per block (4 vector adds per block fewer on AVX2: +20% per core)
        const uint8_t* qs = b + (FMT == Q4_0 ? 2 : 4);
#pragma GCC unroll 8
        for (int v = 0; v < NV / 2; ++v)  // low nibbles are weights 0..15, high ones 16..31
            Vec::nibbles(qs + v * W, 0.0f, q[v], q[NV / 2 + v]);
    }
    uint16_t h;
    std::memcpy(&h, b, 2);
    V d = Vec::set1(f16[h]);
    if (FMT == Q4_0) {
        const float m = -8.0f * f16[h];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) cm[r] += m * xs[r * xs_stride];
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        V t = Vec::mul(q[0], Vec::load(x + r * lda));
#pragma GCC unroll 8
        for (int v = 1; v < NV; ++v) t = Vec::fma(q[v], Vec::load(x + r * lda + v * W), t);
        c[r] = Vec::fma(t, d, c[r]);
    }
    if (FMT == Q4_1) {
        std::memcpy(&h, b + 2, 2);
        const float m = f16[h];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) cm[r] += m * xs[r * xs_stride];
    }
}

// y[r] = one weight row . x row r, for R rows of x: the sum over blocks of d * (quants [32] . x [32])
// (+ m * sum(x) for Q4_1, m = -8 d for Q4_0; xsum [R][K/32] holds the per-block sums of x).
// U blocks per iteration, each into its own accumulators: every block ends in an FMA into the
// row's accumulator (4 cycles of latency), so with one accumulator per row a core did at most one
// block per 4 cycles (~32 G weights/s at M = 1, the limit the Q4 GEMV sat at); U * R >= 4 chains
// hide that latency.
template <int FMT, int R>
static inline void gemv_quant_row(float* y, const float* A, int64_t lda, const float* xsum, const uint8_t* row,
                                  int64_t nblocks, const float* f16) {
    constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
    constexpr int64_t bb = quant_block_bytes(FMT);
    V c[U][R];
    float cm[U][R];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) { c[u][r] = Vec::zero(); cm[u][r] = 0.f; }
    int64_t blk = 0;
    for (; blk + U <= nblocks; blk += U) {
        const uint8_t* b = row + blk * bb;
        // software prefetch ~3 KiB ahead, every line of the U blocks: with the hardware prefetcher
        // alone a core streams GGUF blocks from DRAM at half the rate it can dequantize them
#pragma GCC unroll 4
        for (int64_t off = 0; off < U * bb; off += 64) __builtin_prefetch(b + 3072 + off);
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u)
            quant_block_dot<FMT, R>(c[u], cm[u], A + (blk + u) * QK, lda, xsum ? xsum + blk + u : nullptr, nblocks,
                                    b + u * bb, f16);
    }
    for (; blk < nblocks; ++blk)
        quant_block_dot<FMT, R>(c[0], cm[0], A + blk * QK, lda, xsum ? xsum + blk : nullptr, nblocks, row + blk * bb, f16);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        V s = c[0][r];
        float m = cm[0][r];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) { s = Vec::add(s, c[u][r]); m += cm[u][r]; }
        y[r] = Vec::reduce_add(s) + m;
    }
}

// Q4 on a Vec with a nibble table (AVX-512): the block's 16 possible weights, d * (i - 8) (Q4_0) or
// d * i + m (Q4_1), are one multiply / FMA of a constant vector; one permute per 16 nibbles then
// gives the weights themselves, and they go straight into the accumulators. Per block that is
// 3 FMA-pipe operations like the dot-then-scale route, but Q4_1's m * sum(x) term (a scalar FMA
// and two more loads per block there) disappears: no per-block sums of x, nothing scalar.
// Accumulators [U blocks][R rows][NV]: no chain gets more than one FMA per iteration.
template <int FMT, int R>
static inline void gemv_q4_lut_row(float* y, const float* A, int64_t lda, const uint8_t* row, int64_t nblocks,
                                   const float* f16) {
    constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
    constexpr int64_t bb = quant_block_bytes(FMT);
    const V iota = Vec::iota(FMT == Q4_0 ? -8.0f : 0.0f);
    V c[U][R][NV];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) c[u][r][v] = Vec::zero();
    auto block = [&](V(&cu)[R][NV], const float* x, const uint8_t* b) {
        V table;
        if (FMT == Q4_0) {
            uint16_t h;
            std::memcpy(&h, b, 2);
            table = Vec::mul(iota, Vec::set1(f16[h]));
        } else {  // d and m in one load
            uint32_t dm;
            std::memcpy(&dm, b, 4);
            table = Vec::fma(iota, Vec::set1(f16[dm & 0xffff]), Vec::set1(f16[dm >> 16]));
        }
        const uint8_t* qs = b + (FMT == Q4_0 ? 2 : 4);
        V w[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV / 2; ++v) Vec::nibbles_lut(qs + v * W, table, w[v], w[NV / 2 + v]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) cu[r][v] = Vec::fma(w[v], Vec::load(x + r * lda + v * W), cu[r][v]);
    };
    int64_t blk = 0;
    for (; blk + U <= nblocks; blk += U) {
        const uint8_t* b = row + blk * bb;
#pragma GCC unroll 4
        for (int64_t off = 0; off < U * bb; off += 64) __builtin_prefetch(b + 3072 + off);
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) block(c[u], A + (blk + u) * QK, b + u * bb);
    }
    for (; blk < nblocks; ++blk) block(c[0], A + blk * QK, row + blk * bb);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        V s = c[0][r][0];
#pragma GCC unroll 8
        for (int v = 1; v < NV; ++v) s = Vec::add(s, c[0][r][v]);
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) s = Vec::add(s, c[u][r][v]);
        y[r] = Vec::reduce_add(s);
    }
}

// R >= 3 rows of x (a batched decode step): each block dequantized once to fp32 (dequant_block, the
// values the GEMM's tiles get) and FMA'd straight into the rows' accumulators, so a row costs NV FMAs a
// block and nothing else (the dot-then-scale route above pays a scaling FMA, a min term and a
// horizontal chain per row and block: ~3x this at 8 rows, one core of an AVX2 EPYC). Two accumulators
// per row up to 4 rows, so at least 8 FMA chains are in flight; at most 8 rows + NV weights in registers.
template <int FMT, int R>
static inline void gemv_quant_row_dequant(float* y, const float* A, int64_t lda, const uint8_t* row,
                                          int64_t nblocks) {
    constexpr int64_t bb = quant_block_bytes(FMT);
    constexpr int C = R <= 4 ? 2 : 1;
    V c[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < C; ++j) c[r][j] = Vec::zero();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const uint8_t* b = row + blk * bb;
        __builtin_prefetch(b + 3072);  // blocks are < 64 bytes: every line of the run is prefetched
        V w[NV];
        dequant_block<FMT>(w, b);
        const float* x = A + blk * QK;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) c[r][v % C] = Vec::fma(w[v], Vec::load(x + r * lda + v * W), c[r][v % C]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        V s = c[r][0];
        if (C > 1) s = Vec::add(s, c[r][C - 1]);
        y[r] = Vec::reduce_add(s);
    }
}

// A batched decode step (QTILE_MIN_M..GEMV_MAX_M rows of x) on a Vec with a nibble table (AVX-512):
// tiles of up to 4 weight rows x 4 rows of x, one accumulator each (16 zmm). Each block of the tile's
// weight rows is dequantized into registers once per pass (the nibble table; Q8_0: int8 x d) and each
// 32-value slice of x is loaded once per block for all of them. The one-weight-row kernels above load
// every row of x for every weight row: at 8 rows of x that is 1 KiB of x per 18-byte Q4 block, from
// L2 once x outgrows L1 (K = 4864: 70 GMAC/s on 2 threads against 127 at K = 896). More rows of x
// take further passes of equal sizes over the same weight rows (L1), so a step of 16 rows reads the
// weights from memory once (it was two calls, each streaming them).
static const int QTILE_P = 4, QTILE_R = 4;
static const int QTILE_MIN_M = 3;  // 3 rows: 1.1-1.8x the one-weight-row kernel; 2 rows: 0.9-1.6x, left there

template <int FMT>
static inline void quant_weights(V* w, const uint8_t* b, V iota, const float* f16) {
    uint16_t h;
    std::memcpy(&h, b, 2);
    if constexpr (FMT == Q8_0) {
        const V d = Vec::set1(f16[h]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) w[v] = Vec::mul(Vec::load_i8((const int8_t*)(b + 2) + v * W), d);
    } else if constexpr (Vec::NIBBLE_LUT) {
        V table;
        if (FMT == Q4_0) {
            table = Vec::mul(iota, Vec::set1(f16[h]));
        } else {
            uint16_t m;
            std::memcpy(&m, b + 2, 2);
            table = Vec::fma(iota, Vec::set1(f16[h]), Vec::set1(f16[m]));
        }
        const uint8_t* qs = b + (FMT == Q4_0 ? 2 : 4);
#pragma GCC unroll 8
        for (int v = 0; v < NV / 2; ++v) Vec::nibbles_lut(qs + v * W, table, w[v], w[NV / 2 + v]);
    } else {
        dequant_block<FMT>(w, b);
    }
}

// y[p * ys + r] = weight row p . x row r, for P weight rows (row_bytes apart) and R rows of x
template <int FMT, int P, int R>
static inline void quant_tile(float* y, int64_t ys, const float* A, int64_t lda, const uint8_t* rows,
                              int64_t row_bytes, int64_t nblocks, const float* f16) {
    constexpr int64_t bb = quant_block_bytes(FMT);
    const V iota = Vec::iota(FMT == Q4_0 ? -8.0f : 0.0f);
    V c[P][R];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) c[p][r] = Vec::zero();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        V w[P][NV];
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
            const uint8_t* b = rows + p * row_bytes + blk * bb;
            __builtin_prefetch(b + 3072);
            quant_weights<FMT>(w[p], b, iota, f16);
        }
        const float* x = A + blk * QK;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            V xv[NV];
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) xv[v] = Vec::load(x + r * lda + v * W);
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
                for (int v = 0; v < NV; ++v) c[p][r] = Vec::fma(w[p][v], xv[v], c[p][r]);
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) y[p * ys + r] = Vec::reduce_add(c[p][r]);
}

// tile(P, R) with the compile-time tile shape (p, r) <= (P, R): both arguments std::integral_constant
template <int P, int R, class Tile>
static inline void tile_dispatch(int p, int r, Tile&& tile) {
    if (p < P) {
        if constexpr (P > 1) tile_dispatch<P - 1, R>(p, r, tile);
    } else if (r < R) {
        if constexpr (R > 1) tile_dispatch<P, R - 1>(p, r, tile);
    } else {
        tile(std::integral_constant<int, P>{}, std::integral_constant<int, R>{});
    }
}

// The driver of the batched-decode tiles: tasks are contiguous runs of weight rows (as gemv_quant's),
// taken P at a time; prepare(n, np, thread) once per P rows, then passes of equal sizes over the rows
// of x, tile(n, np, rr, m0, y, thread) filling y[p * R + r] = weight row n + p . x row m0 + r; the bias
// added and stored here.
template <int P, int R, class Prepare, class Tile>
static void gemv_row_tiles(void* out, const void* bias, int64_t M, int64_t N, int adt, Prepare prepare, Tile tile) {
    const int64_t rows_per_task = ceil_div(imax(16, ceil_div(N, 8 * (int64_t)pool_threads())), P) * P;
    const int64_t passes = ceil_div(M, R);
    auto task = [&](int64_t t, int thread) {
        const int64_t n1 = imin(N, (t + 1) * rows_per_task);
        for (int64_t n = t * rows_per_task; n < n1; n += P) {
            const int np = (int)imin(P, n1 - n);
            prepare(n, np, thread);
            for (int64_t pass = 0; pass < passes; ++pass) {
                const int64_t m0 = pass * M / passes, rr = (pass + 1) * M / passes - m0;
                float y[P * R];
                tile(n, np, (int)rr, m0, y, thread);
                for (int p = 0; p < np; ++p)
                    for (int64_t r = 0; r < rr; ++r) {
                        float v = y[p * R + r];
                        if (bias) v += load_scalar(bias, adt, n + p);
                        store_scalar(out, adt, (m0 + r) * N + n + p, v);
                    }
            }
        }
    };
    par(ceil_div(N, rows_per_task), task);
}

template <int FMT>
static void gemv_quant_tiles(void* out, const float* A, int64_t lda, const uint8_t* blocks, const void* bias,
                             int64_t M, int64_t N, int64_t K, int adt) {
    const int64_t nblocks = K / QK, row_bytes = nblocks * quant_block_bytes(FMT);
    const float* f16 = f16_table();
    gemv_row_tiles<QTILE_P, QTILE_R>(
        out, bias, M, N, adt, [](int64_t, int, int) {},
        [&](int64_t n, int np, int rr, int64_t m0, float* y, int) {
            tile_dispatch<QTILE_P, QTILE_R>(np, rr, [&](auto P, auto R) {
                quant_tile<FMT, decltype(P)::value, decltype(R)::value>(y, QTILE_R, A + m0 * lda, lda,
                                                                        blocks + n * row_bytes, row_bytes, nblocks,
                                                                        f16);
            });
        });
}

// Tiles over dequantized weight rows (K-quants on AVX-512 and AVX2; Q8_0 / Q4 on AVX2 measured
// 0.64-0.94x the register-dequantizing kernel there and keep it): each run of DTILE_P weight rows is
// dequantized once per call into a thread's scratch
// (fp32: 16 KiB a row of K = 1024, L1 / L2), then tiles of those rows x up to DTILE_R rows of x, one
// accumulator each, in passes of equal sizes over the rows of x: per W-wide slice DTILE_P + DTILE_R
// loads for DTILE_P x DTILE_R FMAs. DTILE_R: 4 on AVX-512 (16 zmm accumulators), 2 on AVX2 (8 of
// 16 ymm), 0 (off) on the portable path.
static const int DTILE_P = 4, DTILE_R = Vec::DTILE_R;

template <int P, int R>
static inline void f32_rows_tile(float* y, int64_t ys, const float* w, int64_t ldw, const float* A, int64_t lda,
                                 int64_t K) {
    V c[P][R];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) c[p][r] = Vec::zero();
    for (int64_t k = 0; k < K; k += W) {
        V wv[P];
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) wv[p] = Vec::load(w + p * ldw + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const V xv = Vec::load(A + r * lda + k);
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) c[p][r] = Vec::fma(wv[p], xv, c[p][r]);
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) y[p * ys + r] = Vec::reduce_add(c[p][r]);
}

// dequant(float* dst, int64_t n): weight row n as K fp32 values (K a multiple of W)
template <class Dequant>
static void gemv_dequant_tiles(void* out, const float* A, int64_t lda, const void* bias, int64_t M, int64_t N,
                               int64_t K, int adt, Dequant dequant) {
    if constexpr (DTILE_R > 0) {
        for (int t = 0; t < pool_threads(); ++t) scratch(t, 4, (size_t)(DTILE_P * K));  // before any task runs
        // each thread's DTILE_P dequantized rows: its own scratch, written by prepare, read by tile
        gemv_row_tiles<DTILE_P, DTILE_R>(
            out, bias, M, N, adt,
            [&](int64_t n, int np, int thread) {
                float* w = scratch(thread, 4, (size_t)(DTILE_P * K));
                for (int p = 0; p < np; ++p) dequant(w + p * K, n + p);
            },
            [&](int64_t, int np, int rr, int64_t m0, float* y, int thread) {
                const float* w = scratch(thread, 4, (size_t)(DTILE_P * K));
                tile_dispatch<DTILE_P, DTILE_R>(np, rr, [&](auto P, auto R) {
                    f32_rows_tile<decltype(P)::value, decltype(R)::value>(y, DTILE_R, w, K, A + m0 * lda, lda, K);
                });
            });
    }
}

template <int FMT, int R>
static void gemv_quant(void* out, const float* A, int64_t lda, const uint8_t* blocks, const void* bias, int64_t N,
                       int64_t K, int adt) {
    const int64_t nblocks = K / QK, row_bytes = nblocks * quant_block_bytes(FMT);
    // contiguous runs of rows per task (at least 16, about 8 tasks per thread): a thread streams one
    // long run instead of hopping between short ones, which left two threads reading DRAM at ~35 GB/s
    const int64_t rows_per_task = imax(16, ceil_div(N, 8 * (int64_t)pool_threads()));
    const float* f16 = f16_table();
    float* xsum = nullptr;
    constexpr bool dequant_rows = R >= 3 && !(Vec::NIBBLE_LUT && FMT != Q8_0);
    if (FMT != Q8_0 && !Vec::NIBBLE_LUT && !dequant_rows) {
        xsum = scratch(0, 2, (size_t)(R * nblocks));
        for (int r = 0; r < R; ++r)
            for (int64_t blk = 0; blk < nblocks; ++blk) {
                float sum = 0.f;
                for (int i = 0; i < QK; ++i) sum += A[r * lda + blk * QK + i];
                xsum[r * nblocks + blk] = sum;
            }
    }
    auto task = [&](int64_t t, int) {
        int64_t n0 = t * rows_per_task, n1 = imin(N, n0 + rows_per_task);
        float y[QGEMV_MAX_M];
        for (int64_t n = n0; n < n1; ++n) {
            // one row at a time: a single sequential stream per thread reads DRAM fastest here
            if constexpr (Vec::NIBBLE_LUT && FMT != Q8_0)
                gemv_q4_lut_row<FMT, R>(y, A, lda, blocks + n * row_bytes, nblocks, f16);
            else if constexpr (dequant_rows)
                gemv_quant_row_dequant<FMT, R>(y, A, lda, blocks + n * row_bytes, nblocks);
            else
                gemv_quant_row<FMT, R>(y, A, lda, xsum, blocks + n * row_bytes, nblocks, f16);
            for (int r = 0; r < R; ++r) {
                float v = y[r];
                if (bias) v += load_scalar(bias, adt, n);
                store_scalar(out, adt, r * N + n, v);
            }
        }
    };
    par(ceil_div(N, rows_per_task), task);
}

template <int FMT>
static void linear_quant_t(void* out, const float* A, int64_t lda, const uint8_t* blocks, const void* bias, int64_t M,
                           int64_t N, int64_t K, int adt) {
    if (Vec::NIBBLE_LUT && M >= QTILE_MIN_M && M <= GEMV_MAX_M) {
        gemv_quant_tiles<FMT>(out, A, lda, blocks, bias, M, N, K, adt);
        return;
    }
    if (M > QGEMV_MAX_M && M <= QGEMV_PASSES * QGEMV_MAX_M) {  // a wide decode step: GEMV passes of <= 8 rows
        for (int64_t m0 = 0; m0 < M; m0 += QGEMV_MAX_M)
            linear_quant_t<FMT>((char*)out + m0 * N * dtype_bytes(adt), A + m0 * lda, lda, blocks, bias,
                                imin(QGEMV_MAX_M, M - m0), N, K, adt);
        return;
    }
    if (M <= QGEMV_MAX_M) {
        switch (M) {
            case 1: gemv_quant<FMT, 1>(out, A, lda, blocks, bias, N, K, adt); break;
            case 2: gemv_quant<FMT, 2>(out, A, lda, blocks, bias, N, K, adt); break;
            case 3: gemv_quant<FMT, 3>(out, A, lda, blocks, bias, N, K, adt); break;
            case 4: gemv_quant<FMT, 4>(out, A, lda, blocks, bias, N, K, adt); break;
            case 5: gemv_quant<FMT, 5>(out, A, lda, blocks, bias, N, K, adt); break;
            case 6: gemv_quant<FMT, 6>(out, A, lda, blocks, bias, N, K, adt); break;
            case 7: gemv_quant<FMT, 7>(out, A, lda, blocks, bias, N, K, adt); break;
            default: gemv_quant<FMT, 8>(out, A, lda, blocks, bias, N, K, adt); break;
        }
        return;
    }
    const int64_t bb = quant_block_bytes(FMT), row_bytes = K / QK * bb;
    // dequantize a [32 rows][kc] tile into the k-major [kc][32] block the micro-kernel reads
    auto block = [&](int64_t p, int64_t k0, int64_t kc, int thread) -> const float* {
        float* buf = scratch(thread, 2, (size_t)(KC * PANEL));
        alignas(64) float tmp[QK];
        for (int64_t j = 0; j < PANEL; ++j) {
            int64_t n = p * PANEL + j;
            if (n >= N) {
                for (int64_t k = 0; k < kc; ++k) buf[k * PANEL + j] = 0.f;
                continue;
            }
            const uint8_t* row = blocks + n * row_bytes;
            for (int64_t kb = 0; kb < kc; kb += QK) {
                V w[NV];
                dequant_block<FMT>(w, row + (k0 + kb) / QK * bb);
                for (int v = 0; v < NV; ++v) Vec::store(tmp + v * W, w[v]);
                for (int i = 0; i < QK; ++i) buf[(kb + i) * PANEL + j] = tmp[i];
            }
        }
        return buf;
    };
    gemm(out, A, lda, bias, M, N, K, adt, block);
}

#include "kquant_impl.h"  // Q4_K / Q5_K / Q6_K: linear_kquant_t

// block b of an int8-route panel (int8.h) as fp32: out[t * os + r] = weight t of row r (t < 32,
// r < 16), the values of int8_dequant_block (the same scales and order of operations). Loops over the
// 16 rows of one 4-byte element per row, so each vectorizes over rows.
template <int FMT>
static inline void record_f32(float* out, int64_t os, const uint8_t* panel, int64_t b) {
    constexpr int OFF = int8_code_offset(FMT);
    constexpr bool OFFW = FMT == Q4_1 || int8_has_header(FMT);
    const uint8_t* rec = panel + int8_record_offset(FMT, b);
    float s0[I8_ROWS], s1[I8_ROWS], off[I8_ROWS];
    uint32_t e[I8_ROWS], h0[I8_ROWS], h1[I8_ROWS];
    for (int r = 0; r < I8_ROWS; ++r) int8_record_scales(s0[r], s1[r], off[r], panel, b, r, FMT);
    if constexpr (FMT == Q5_K) std::memcpy(h0, rec + 256, sizeof h0);
    if constexpr (FMT == Q6_K) {
        std::memcpy(h0, rec + 256, sizeof h0);
        std::memcpy(h1, rec + 320, sizeof h1);
    }
    if constexpr (FMT == Q8_0) {
        for (int j = 0; j < 8; ++j) {
            std::memcpy(e, rec + 64 * j, sizeof e);
            for (int i = 0; i < 4; ++i)
                for (int r = 0; r < I8_ROWS; ++r) out[(4 * j + i) * os + r] = s0[r] * (float)((int)((e[r] >> (8 * i)) & 255) - OFF);
        }
        return;
    }
    for (int j = 0; j < 4; ++j) {
        std::memcpy(e, rec + 64 * j, sizeof e);
        for (int i = 0; i < 4; ++i) {
            float* lo = out + (4 * j + i) * os;
            float* hi = out + (16 + 4 * j + i) * os;
            for (int r = 0; r < I8_ROWS; ++r) {
                int ul = (int)((e[r] >> (8 * i)) & 15), uh = (int)((e[r] >> (8 * i + 4)) & 15);
                if constexpr (FMT == Q5_K) {
                    ul |= (int)((h0[r] >> (8 * i + j)) & 1) << 4;
                    uh |= (int)((h0[r] >> (8 * i + 4 + j)) & 1) << 4;
                }
                if constexpr (FMT == Q6_K) {
                    ul |= (int)((h0[r] >> (8 * i + 2 * j)) & 3) << 4;
                    uh |= (int)((h1[r] >> (8 * i + 2 * j)) & 3) << 4;
                }
                const float vl = s0[r] * (float)(ul - OFF), vh = s1[r] * (float)(uh - OFF);
                lo[r] = OFFW ? vl + off[r] : vl;
                hi[r] = OFFW ? vh + off[r] : vh;
            }
        }
    }
}

// GGUF blocks repacked for the int8 route (int8.h: panels of 16 rows), on fp32 activations:
// linear_quant_t's GEMM, each [kc][32] weight block decoded out of the two int8 panels under it
template <int FMT>
static void linear_repacked_t(void* out, const float* A, int64_t lda, const uint8_t* packed, const void* bias, int64_t M,
                              int64_t N, int64_t K, int adt) {
    static_assert(PANEL == 2 * I8_ROWS, "a GEMM panel is two int8 panels");
    const int64_t pb = int8_panel_bytes(FMT, K), panels = (N + I8_ROWS - 1) / I8_ROWS;
    auto block = [&](int64_t p, int64_t k0, int64_t kc, int thread) -> const float* {
        float* buf = scratch(thread, 2, (size_t)(KC * PANEL));
        for (int h = 0; h < 2; ++h) {
            const int64_t ip = 2 * p + h;  // rows past N: zero codes and scales in their panel, or no panel
            if (ip >= panels) {
                for (int64_t k = 0; k < kc; ++k)
                    for (int r = 0; r < I8_ROWS; ++r) buf[k * PANEL + I8_ROWS * h + r] = 0.f;
                continue;
            }
            for (int64_t kb = 0; kb < kc; kb += QK)
                record_f32<FMT>(buf + kb * PANEL + I8_ROWS * h, PANEL, packed + ip * pb, (k0 + kb) / QK);
        }
        return buf;
    };
    gemm(out, A, lda, bias, M, N, K, adt, block);
}

// the one entry point: wfmt says how `weights` are stored (enum WeightFormat)
static void linear(void* out, const void* x, const void* weights, const void* bias, int64_t M, int64_t N, int64_t K,
                   int64_t xs, int adt, int wfmt) {
    int64_t lda;
    const float* A = x_as_f32(x, M, K, xs, adt, &lda);
    const uint8_t* blocks = (const uint8_t*)weights;
    if (wfmt >= W_INT8) {
        if (wfmt == W_INT8 + Q8_0) linear_repacked_t<Q8_0>(out, A, lda, blocks, bias, M, N, K, adt);
        else if (wfmt == W_INT8 + Q4_0) linear_repacked_t<Q4_0>(out, A, lda, blocks, bias, M, N, K, adt);
        else if (wfmt == W_INT8 + Q4_1) linear_repacked_t<Q4_1>(out, A, lda, blocks, bias, M, N, K, adt);
        else if (wfmt == W_INT8 + Q4_K) linear_repacked_t<Q4_K>(out, A, lda, blocks, bias, M, N, K, adt);
        else if (wfmt == W_INT8 + Q5_K) linear_repacked_t<Q5_K>(out, A, lda, blocks, bias, M, N, K, adt);
        else linear_repacked_t<Q6_K>(out, A, lda, blocks, bias, M, N, K, adt);
        return;
    }
    switch (wfmt) {
        case W_F32: linear_dense_t<DT_F32>(out, A, lda, weights, bias, M, N, K, adt); break;
        case W_F16: linear_dense_t<DT_F16>(out, A, lda, weights, bias, M, N, K, adt); break;
        case W_BF16: linear_dense_t<DT_BF16>(out, A, lda, weights, bias, M, N, K, adt); break;
        case W_Q8_0: linear_quant_t<Q8_0>(out, A, lda, blocks, bias, M, N, K, adt); break;
        case W_Q4_0: linear_quant_t<Q4_0>(out, A, lda, blocks, bias, M, N, K, adt); break;
        case W_Q4_K: linear_kquant_t<W_Q4_K>(out, A, lda, blocks, bias, M, N, K, adt); break;
        case W_Q5_K: linear_kquant_t<W_Q5_K>(out, A, lda, blocks, bias, M, N, K, adt); break;
        case W_Q6_K: linear_kquant_t<W_Q6_K>(out, A, lda, blocks, bias, M, N, K, adt); break;
        default: linear_quant_t<Q4_1>(out, A, lda, blocks, bias, M, N, K, adt); break;
    }
}

// ============================================================================
// attention: flash-style (online softmax over blocks of ATT_KB keys), GQA without repeating K/V
//
// Work items: (batch, kv head, tile of ATT_RT query rows, key split). The rows of a tile are
// (query position, q head of the group) pairs, so one K/V block serves every q head that reads
// it. Row i of sequence b sees keys j < limit = kv_len[b] (and j <= q_pos[b] + i when causal):
// always a prefix, so only the last block a row reaches needs a mask. When there are fewer
// items than threads (decode), keys are split and the partial softmax states merged.
//
// K is converted to fp32 and transposed per block of keys to [D][KB] (scores for a block of keys
// are then W-wide FMAs, no horizontal sums; one block is 16 KiB contiguous, so no L1 set
// conflicts): up front when several items share a block, else by the item itself. V is read in
// place when D is a multiple of W, else converted to fp32 rows padded to Dp.

// rows r0 .. r1 of `base` (row stride `stride` bytes, `bytes` each) into the cache, ahead of their use
static inline void prefetch_rows(const char* base, int64_t stride, int64_t bytes, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(base + r * stride + o);
}

static const int64_t ATT_KB = 64;
static const int64_t ATT_RT = 16;

static const int ATT_NS = ATT_KB / W;                // score vectors per row and block
static const int ATT_RMAX = ATT_NS >= 8 ? 2 : 4;        // rows per pass: 4 x 4 zmm score accumulators

// One block of keys for R consecutive query rows at once (so the FMA chains of several rows overlap
// and each K/V load serves R rows): online-softmax update of (m, l, acc) for each row.
// q [R][Dp] (pre-scaled), acc [R][Dp]; kt [D][ATT_KB] transposed keys; vb: the block's values,
// rows of dtype vdt, row stride vs, at least Dp readable columns; nvis[r]: the first nvis[r] keys
// of the block are visible to row r (>= 1).
// p [R][ATT_KB] = the scores of q's R rows against the block's first NV x W keys (kt [D][ATT_KB])
template <int R, int NV>
static inline void block_scores(float (*p)[ATT_KB], const float* q, int64_t Dp, const float* kt, int64_t D) {
    V s[R][NV];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) s[r][v] = Vec::zero();
    tile_fma<R, NV>(s, q, Dp, kt, ATT_KB, D);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) Vec::store(p[r] + v * W, s[r][v]);
}

// block_scores for the first nsv (1..ATT_NS) score vectors
template <int R, int NV = 1>
static inline void block_scores_n(int nsv, float (*p)[ATT_KB], const float* q, int64_t Dp, const float* kt, int64_t D) {
    if constexpr (NV < ATT_NS) {
        if (nsv > NV) {
            block_scores_n<R, NV + 1>(nsv, p, q, Dp, kt, D);
            return;
        }
    }
    block_scores<R, NV>(p, q, Dp, kt, D);
}

template <int R>
static inline void attend_block(const float* q, float* acc, float* m, float* l, const int64_t* nvis, const float* kt,
                                const void* vb, int64_t vs, int vdt, int64_t D, int64_t Dp) {
    alignas(64) float p[R][ATT_KB];
    float corr[R];
    int64_t nmax = 0;
    for (int r = 0; r < R; ++r) nmax = imax(nmax, nvis[r]);
    // only the score vectors that hold a visible key (the last block of a short context holds few):
    // the keys past them are never read (nor even converted: convert_block's j_end)
    const int nsv = (int)ceil_div(nmax, W);
    block_scores_n<R>(nsv, p, q, Dp, kt, D);
    for (int r = 0; r < R; ++r) {
        for (int64_t j = nvis[r]; j < nsv * W; ++j) p[r][j] = -INFINITY;
        V mx = Vec::load(p[r]);
        for (int v = 1; v < nsv; ++v) mx = Vec::max(mx, Vec::load(p[r] + v * W));
        const float bm = Vec::reduce_max(mx);
        const float m_new = m[r] > bm ? m[r] : bm;
        corr[r] = std::exp(m[r] - m_new);  // 0 for a row's first visible block (m = -inf)
        V mv = Vec::set1(m_new), sum = Vec::zero();
        for (int v = 0; v < nsv; ++v) {
            V e = vexp(Vec::sub(Vec::load(p[r] + v * W), mv));  // masked: exp(-inf) = 0
            Vec::store(p[r] + v * W, e);
            sum = Vec::add(sum, e);
        }
        l[r] = l[r] * corr[r] + Vec::reduce_add(sum);
        m[r] = m_new;
    }
    // acc = acc * corr + p . V[0 : nmax] (p is 0 past a row's own nvis); keys in pairs, two chains per row
    for (int64_t d0 = 0; d0 < Dp; d0 += W) {
        V c0[R], c1[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            c0[r] = Vec::mul(Vec::load(acc + r * Dp + d0), Vec::set1(corr[r]));
            c1[r] = Vec::zero();
        }
        int64_t j = 0;
        for (; j + 2 <= nmax; j += 2) {
            V v0 = load_dt(vb, vdt, j * vs + d0), v1 = load_dt(vb, vdt, (j + 1) * vs + d0);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                c0[r] = Vec::fma(Vec::set1(p[r][j]), v0, c0[r]);
                c1[r] = Vec::fma(Vec::set1(p[r][j + 1]), v1, c1[r]);
            }
        }
        if (j < nmax) {
            V v0 = load_dt(vb, vdt, j * vs + d0);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) c0[r] = Vec::fma(Vec::set1(p[r][j]), v0, c0[r]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) Vec::store(acc + r * Dp + d0, Vec::add(c0[r], c1[r]));
    }
}

static void attention(const AttentionArgs* a) {
    const int dt = a->dt;
    const int kdt = a->kvdt;  // keys and values: a KV cache's dtype, which may differ from q's and out's
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, Sq = a->Sq, D = a->D, G = Hq / Hkv;
    const int64_t Dp = ceil_div(D, W) * W;
    // keys beyond every kv_len are never visible
    int64_t Skv = 0;
    for (int64_t b = 0; b < B; ++b) Skv = imax(Skv, (int64_t)a->kv_len[b]);
    const int64_t Skp = ceil_div(imax(Skv, 1), ATT_KB) * ATT_KB;
    const int64_t rows = Sq * G, tiles = ceil_div(rows, ATT_RT), base_items = B * Hkv * tiles;
    const int64_t threads = pool_threads();
    int64_t splits = 1;
    if (base_items < 2 * threads && Skv >= 4 * ATT_KB)
        splits = imin(ceil_div(2 * threads, base_items), Skv / (2 * ATT_KB));
    const int64_t keys_per_split = ceil_div(ceil_div(imax(Skv, 1), splits), ATT_KB) * ATT_KB;

    // V is read in place when its rows hold whole vectors; otherwise it is copied to padded fp32 rows
    const bool v_in_place = D % W == 0;
    // kt [D][ATT_KB] (and, unless V is read in place, vf [ATT_KB][Dp]) = keys (values) j0 .. j0 + KB of
    // (batch b, kv head hk) in fp32, zero from j_end (<= Skv: past it no row of the caller looks) to the
    // end of the W-wide group of keys it falls in; later groups are left as they are (attend_block
    // reads no score vector past the last visible key, and no value row past it)
    auto convert_block = [&](float* kt, float* vf, int64_t b, int64_t hk, int64_t j0, int64_t j_end, int thread) {
        const char* kbase = at(a->k, b * a->k_stride[0] + hk * a->k_stride[1], kdt);
        const char* vrows = at(a->v, b * a->v_stride[0] + hk * a->v_stride[1], kdt);
        const int64_t kb = imin(ATT_KB, ceil_div(j_end - j0, W) * W);  // keys of the block to convert
        if (D % W == 0) {
            // W keys x W dims at a time through a register transpose; the keys two groups ahead and this
            // group's values (read next, by attend_block) are fetched meanwhile: a decode step's cache
            // rows come from memory, and one thread's demand loads alone reached ~7 GB/s
            for (int64_t jb = 0; jb < kb; jb += W) {
                prefetch_rows(kbase, a->k_stride[2] * dtype_bytes(kdt), D * dtype_bytes(kdt), j0 + jb + 2 * W,
                              imin(j_end, j0 + jb + 3 * W));
                prefetch_rows(vrows, a->v_stride[2] * dtype_bytes(kdt), D * dtype_bytes(kdt), j0 + jb,
                              imin(j_end, j0 + jb + W));
                for (int64_t d0 = 0; d0 < D; d0 += W) {
                    V r[W];
                    for (int i = 0; i < W; ++i) {
                        int64_t j = j0 + jb + i;
                        r[i] = j < j_end ? load_dt(kbase, kdt, j * a->k_stride[2] + d0) : Vec::zero();
                    }
                    Vec::transpose(r);
                    for (int i = 0; i < W; ++i) Vec::store(kt + (d0 + i) * ATT_KB + jb, r[i]);
                }
            }
        } else {
            float* row = scratch(thread, 2, (size_t)Dp);
            for (int64_t j = j0; j < j0 + kb; ++j) {
                if (j < j_end) row_to_f32(row, kbase + j * a->k_stride[2] * dtype_bytes(kdt), kdt, D);
                for (int64_t d = 0; d < D; ++d) kt[d * ATT_KB + j - j0] = j < j_end ? row[d] : 0.f;
            }
        }
        if (v_in_place) return;
        for (int64_t jj = 0, j = j0; jj < kb; ++jj, ++j) {
            if (j < j_end)
                row_to_f32(vf + jj * Dp, at(a->v, b * a->v_stride[0] + hk * a->v_stride[1] + j * a->v_stride[2], kdt), kdt, D);
            else
                for (int64_t d = 0; d < D; ++d) vf[jj * Dp + d] = 0.f;
            for (int64_t d = D; d < Dp; ++d) vf[jj * Dp + d] = 0.f;
        }
    };
    // with several row tiles per (batch, kv head) every block serves several items: convert K / V
    // once, up front (Kt [B * Hkv][Skv / KB][D][KB]); with one tile (decode) each item converts its
    // own blocks into a per-thread buffer, used while still in L1
    const bool shared_blocks = tiles > 1;
    float* Kt = shared_blocks ? scratch(0, 6, (size_t)(B * Hkv * D * Skp)) : nullptr;
    float* Vf = shared_blocks && !v_in_place ? scratch(0, 7, (size_t)(B * Hkv * Skp * Dp)) : nullptr;
    const int64_t head_blocks = Skp / ATT_KB;
    auto convert = [&](int64_t t, int thread) {
        int64_t bh = t / head_blocks, j0 = (t % head_blocks) * ATT_KB;
        convert_block(Kt + bh * D * Skp + j0 * D, Vf ? Vf + (bh * Skp + j0) * Dp : nullptr, bh / Hkv, bh % Hkv, j0,
                      Skv, thread);
    };
    if (shared_blocks) par(B * Hkv * head_blocks, convert);

    const int64_t part_stride = Dp + 2;  // per row: m, l, acc [Dp]
    float* partial = splits > 1 ? scratch(0, 5, (size_t)(base_items * splits * ATT_RT * part_stride)) : nullptr;

    auto item = [&](int64_t t, int thread) {
        const int64_t split = t % splits, base = t / splits, tile = base % tiles, bh = base / tiles;
        const int64_t b = bh / Hkv, hk = bh % Hkv;
        const int64_t r0 = tile * ATT_RT, nr = imin(ATT_RT, rows - r0);
        // values: in place (dtype kdt, row stride v_stride[2]) or padded fp32 rows
        const void* vbase = v_in_place ? (const void*)at(a->v, b * a->v_stride[0] + hk * a->v_stride[1], kdt)
                                       : (const void*)(shared_blocks ? Vf + bh * Skp * Dp : nullptr);
        const int64_t vs = v_in_place ? a->v_stride[2] : Dp;
        const int vdt = v_in_place ? kdt : DT_F32;
        float* own_k = shared_blocks ? nullptr : scratch(thread, 0, (size_t)(D * ATT_KB));
        float* own_v = shared_blocks || v_in_place ? nullptr : scratch(thread, 1, (size_t)(ATT_KB * Dp));
        float* Q = scratch(thread, 3, (size_t)(ATT_RT * Dp));
        float* acc = scratch(thread, 4, (size_t)(ATT_RT * Dp));
        float mrow[ATT_RT], lrow[ATT_RT];
        int64_t limit[ATT_RT], kend = 0;
        const int64_t kv = a->kv_len[b], qp = a->q_pos[b];
        if (!shared_blocks)  // the first two groups of keys, while the queries are read
            prefetch_rows(at(a->k, b * a->k_stride[0] + hk * a->k_stride[1], kdt), a->k_stride[2] * dtype_bytes(kdt),
                          D * dtype_bytes(kdt), split * keys_per_split, imin(kv, split * keys_per_split + 2 * W));
        for (int64_t r = 0; r < nr; ++r) {
            int64_t i = (r0 + r) / G, h = hk * G + (r0 + r) % G;
            limit[r] = a->causal ? imin(kv, qp + i + 1) : kv;
            kend = imax(kend, limit[r]);
            row_to_f32(Q + r * Dp, at(a->q, b * a->q_stride[0] + h * a->q_stride[1] + i * a->q_stride[2], dt), dt, D);
            for (int64_t d = 0; d < D; ++d) Q[r * Dp + d] *= a->scale;
            for (int64_t d = 0; d < Dp; ++d) acc[r * Dp + d] = 0.f;
            mrow[r] = -INFINITY;
            lrow[r] = 0.f;
        }
        const int64_t k_lo = split * keys_per_split, k_hi = imin(kend, k_lo + keys_per_split);
        for (int64_t j0 = k_lo; j0 < k_hi; j0 += ATT_KB) {
            const float* ktb;
            const void* vb;
            if (shared_blocks) {
                ktb = Kt + bh * D * Skp + j0 * D;
                vb = at(vbase, j0 * vs, vdt);
            } else {
                convert_block(own_k, own_v, b, hk, j0, kend, thread);
                ktb = own_k;
                vb = v_in_place ? (const void*)at(vbase, j0 * vs, vdt) : (const void*)own_v;
            }
            // the rows that see a key of this block: limit grows with the row (rows are position-major),
            // so they are the rows from `first` on; in passes of up to ATT_RMAX rows
            int64_t first = 0;
            while (first < nr && j0 >= limit[first]) ++first;
            for (int64_t r = first; r < nr; r += ATT_RMAX) {
                const int R = (int)imin(ATT_RMAX, nr - r);
                int64_t nvis[ATT_RMAX];
                for (int i = 0; i < R; ++i) nvis[i] = imin(ATT_KB, limit[r + i] - j0);
                const float* q = Q + r * Dp;
                float* ar = acc + r * Dp;
                switch (R) {
                    case 1: attend_block<1>(q, ar, mrow + r, lrow + r, nvis, ktb, vb, vs, vdt, D, Dp); break;
                    case 2: attend_block<2>(q, ar, mrow + r, lrow + r, nvis, ktb, vb, vs, vdt, D, Dp); break;
                    case 3:
                        if constexpr (ATT_RMAX >= 3) attend_block<3>(q, ar, mrow + r, lrow + r, nvis, ktb, vb, vs, vdt, D, Dp);
                        break;
                    default:
                        if constexpr (ATT_RMAX >= 4) attend_block<4>(q, ar, mrow + r, lrow + r, nvis, ktb, vb, vs, vdt, D, Dp);
                        break;
                }
            }
        }
        for (int64_t r = 0; r < nr; ++r) {
            if (splits > 1) {
                float* pr = partial + ((base * splits + split) * ATT_RT + r) * part_stride;
                pr[0] = mrow[r];
                pr[1] = lrow[r];
                std::memcpy(pr + 2, acc + r * Dp, (size_t)Dp * 4);
                continue;
            }
            int64_t i = (r0 + r) / G, h = hk * G + (r0 + r) % G;
            char* y = at(a->out, ((b * Hq + h) * Sq + i) * D, dt);
            V inv = Vec::set1(lrow[r] > 0.f ? 1.0f / lrow[r] : 0.f);  // no visible key: zeros
            int64_t d = 0;
            for (; d + W <= D; d += W) store_dt(y, dt, d, Vec::mul(Vec::load(acc + r * Dp + d), inv));
            if (d < D) store_dt_part(y, dt, d, Vec::mul(Vec::load(acc + r * Dp + d), inv), D - d);
        }
    };
    par(base_items * splits, item);
    if (splits == 1) return;

    auto merge = [&](int64_t base, int thread) {
        const int64_t tile = base % tiles, bh = base / tiles, b = bh / Hkv, hk = bh % Hkv;
        const int64_t r0 = tile * ATT_RT, nr = imin(ATT_RT, rows - r0);
        float* sum = scratch(thread, 3, (size_t)Dp);
        for (int64_t r = 0; r < nr; ++r) {
            float m = -INFINITY, l = 0.f;
            for (int64_t s = 0; s < splits; ++s) {
                float ms = partial[((base * splits + s) * ATT_RT + r) * part_stride];
                m = ms > m ? ms : m;
            }
            for (int64_t d = 0; d < Dp; ++d) sum[d] = 0.f;
            for (int64_t s = 0; s < splits; ++s) {
                const float* pr = partial + ((base * splits + s) * ATT_RT + r) * part_stride;
                if (pr[1] == 0.f) continue;  // no visible key in this split
                float f = std::exp(pr[0] - m);
                l += pr[1] * f;
                V fv = Vec::set1(f);
                for (int64_t d = 0; d < Dp; d += W) Vec::store(sum + d, Vec::fma(fv, Vec::load(pr + 2 + d), Vec::load(sum + d)));
            }
            int64_t i = (r0 + r) / G, h = hk * G + (r0 + r) % G;
            char* y = at(a->out, ((b * Hq + h) * Sq + i) * D, dt);
            V inv = Vec::set1(l > 0.f ? 1.0f / l : 0.f);
            int64_t d = 0;
            for (; d + W <= D; d += W) store_dt(y, dt, d, Vec::mul(Vec::load(sum + d), inv));
            if (d < D) store_dt_part(y, dt, d, Vec::mul(Vec::load(sum + d), inv), D - d);
        }
    };
    par(base_items, merge);
}

static const KernelTable table = {
    nullptr, rms_norm, layer_norm, silu_mul, gelu, rope, linear, attention,
};
