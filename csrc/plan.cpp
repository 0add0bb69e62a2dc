// Runs a compiled step plan (plan.h): every node's kernel in order, with no Python in between.
#include "plan.h"

#include <chrono>
#include <cstring>

void embedding(void* out, const int64_t* ids, const void* table, int64_t N, int64_t H, int64_t ts, int64_t elem_bytes);
void embedding_prepared(void* out, const int64_t* ids, const void* weights, int64_t N, int64_t H, int wfmt, int dt);

namespace {

// a node's tensor: the slot's pointer + offset; a KV-cache ref also moves to the run's first row
// (ref.cache = bytes of one cache row per position, Hkv * D * element bytes)
inline char* at(const PlanRef& r, const PlanRun& run) {
    if (r.slot < 0) return nullptr;
    return (char*)run.slots[(size_t)r.slot] + r.offset + run.row0 * r.cache * run.T;
}

// ----------------------------------------------------------------------------
// glue

void add(void* out, const void* a, const void* b, int64_t n, int dt) {
    if (dt == DT_F32) {
        float* o = (float*)out;
        const float *x = (const float*)a, *y = (const float*)b;
        for (int64_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
        return;
    }
    for (int64_t i = 0; i < n; ++i) store_scalar(out, dt, i, load_scalar(a, dt, i) + load_scalar(b, dt, i));
}

// out [B, H, S, D] rows of n_new = kv_len - q_pos tokens (dtype sdt) -> cache rows at q_pos (rows row0..,
// dtype cdt: converted, rounded to nearest even as torch rounds, when the cache's dtype is another)
void kv_write(char* cache, const char* src, const int32_t* q_pos, const int32_t* kv_len, int64_t B, int64_t Hkv,
              int64_t T, int64_t D, int64_t sb, int64_t sh, int64_t ss, int sdt, int cdt) {
    const int64_t seb = dtype_bytes(sdt), ceb = dtype_bytes(cdt);
    for (int64_t b = 0; b < B; ++b) {
        const int64_t n = kv_len[b] - q_pos[b], at = q_pos[b];
        for (int64_t h = 0; h < Hkv; ++h)
            for (int64_t i = 0; i < n; ++i) {
                char* to = cache + ((b * Hkv + h) * T + at + i) * D * ceb;
                const char* from = src + (b * sb + h * sh + i * ss) * seb;
                if (sdt == cdt) {
                    std::memcpy(to, from, (size_t)(D * ceb));
                    continue;
                }
                for (int64_t d = 0; d < D; ++d) store_scalar(to, cdt, d, load_scalar(from, sdt, d));
            }
    }
}

}  // namespace

void plan_run(const std::vector<PlanNode>& nodes, const PlanRun& run, const KernelTable& k, LinearFn linear_int8,
              double* seconds) {
    using clock = std::chrono::steady_clock;
    clock::time_point t0;
    if (seconds) t0 = clock::now();
    for (size_t node = 0; node < nodes.size(); ++node) {
        const PlanNode& n = nodes[node];
        const int64_t* i = n.i;
        switch (n.op) {
            case P_EMBEDDING:  // i[4]: -1 a dense table, else the prepared weight's format (rows of panels / blocks)
                if (i[4] < 0)
                    embedding(at(n.r[0], run), (const int64_t*)at(n.r[1], run), at(n.r[2], run), i[0], i[1], i[2], i[3]);
                else
                    embedding_prepared(at(n.r[0], run), (const int64_t*)at(n.r[1], run), at(n.r[2], run), i[0], i[1],
                                       (int)i[4], (int)i[5]);
                break;
            case P_RMS_NORM:
                k.rms_norm(at(n.r[0], run), at(n.r[1], run), at(n.r[2], run), i[0], i[1], i[2], n.f, (int)i[3]);
                break;
            case P_LAYER_NORM:
                k.layer_norm(at(n.r[0], run), at(n.r[1], run), at(n.r[2], run), at(n.r[3], run), i[0], i[1], i[2], n.f,
                             (int)i[3]);
                break;
            case P_LINEAR:
                if (i[6]) {  // weights repacked for the int8 route; i[5] its format code
                    linear_int8(at(n.r[0], run), at(n.r[1], run), at(n.r[2], run), at(n.r[3], run), i[0], i[1], i[2],
                                i[3], (int)i[4], (int)i[5], (int)i[6]);
                    break;
                }
                k.linear(at(n.r[0], run), at(n.r[1], run), at(n.r[2], run), at(n.r[3], run), i[0], i[1], i[2], i[3],
                         (int)i[4], (int)i[5]);
                break;
            case P_ROPE:
                k.rope(at(n.r[0], run), at(n.r[1], run), (const int64_t*)at(n.r[2], run),
                       (const double*)at(n.r[3], run), i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], (int)i[8],
                       (int)i[9]);
                break;
            case P_SILU_MUL:
                k.silu_mul(at(n.r[0], run), at(n.r[1], run), i[0], i[1], i[2], (int)i[3]);
                break;
            case P_GELU:
                k.gelu(at(n.r[0], run), at(n.r[1], run), i[0], i[1], i[2], (int)i[3], (int)i[4]);
                break;
            case P_ATTENTION: {
                AttentionArgs a;
                a.out = at(n.r[0], run);
                a.q = at(n.r[1], run);
                a.k = at(n.r[2], run);
                a.v = at(n.r[3], run);
                a.q_pos = (const int32_t*)at(n.r[4], run);
                a.kv_len = (const int32_t*)at(n.r[5], run);
                a.B = i[0]; a.Hq = i[1]; a.Hkv = i[2]; a.Sq = i[3]; a.Sk = i[4]; a.D = i[5];
                for (int d = 0; d < 3; ++d) {
                    a.q_stride[d] = i[6 + d];
                    a.k_stride[d] = i[9 + d];
                    a.v_stride[d] = i[12 + d];
                }
                if (n.r[2].cache) {  // keys and values are cache rows of T positions
                    a.Sk = run.T;
                    a.k_stride[0] = a.v_stride[0] = a.Hkv * run.T * a.D;
                    a.k_stride[1] = a.v_stride[1] = run.T * a.D;
                    a.k_stride[2] = a.v_stride[2] = a.D;
                }
                a.causal = (int)i[15];
                a.dt = (int)i[16];
                a.kvdt = (int)i[17];
                a.scale = n.f;
                k.attention(&a);
                break;
            }
            case P_ADD:
                add(at(n.r[0], run), at(n.r[1], run), at(n.r[2], run), i[0], (int)i[1]);
                break;
            case P_KV_WRITE: {
                const int32_t *q_pos = (const int32_t*)at(n.r[4], run), *kv_len = (const int32_t*)at(n.r[5], run);
                kv_write(at(n.r[0], run), at(n.r[2], run), q_pos, kv_len, i[0], i[1], run.T, i[3], i[4], i[5], i[6],
                         (int)i[10], (int)i[11]);
                kv_write(at(n.r[1], run), at(n.r[3], run), q_pos, kv_len, i[0], i[1], run.T, i[3], i[7], i[8], i[9],
                         (int)i[10], (int)i[11]);
                break;
            }
            case P_MERGE_HEADS: {  // [B, H, S, D] -> [B, S, H, D]
                char* out = at(n.r[0], run);
                const char* a = at(n.r[1], run);
                const int64_t B = i[0], H = i[1], S = i[2], D = i[3], eb = i[4];
                for (int64_t b = 0; b < B; ++b)
                    for (int64_t h = 0; h < H; ++h)
                        for (int64_t s = 0; s < S; ++s)
                            std::memcpy(out + (((b * S + s) * H + h) * D) * eb, a + (((b * H + h) * S + s) * D) * eb,
                                        (size_t)(D * eb));
                break;
            }
            case P_LAST_ROWS: {
                char* out = at(n.r[0], run);
                const char* x = at(n.r[1], run);
                const int32_t *q_pos = (const int32_t*)at(n.r[2], run), *kv_len = (const int32_t*)at(n.r[3], run);
                const int64_t B = i[0], S = i[1], row = i[2] * i[3];
                for (int64_t b = 0; b < B; ++b) {
                    const int64_t last = kv_len[b] - q_pos[b] > 0 ? kv_len[b] - q_pos[b] - 1 : 0;
                    std::memcpy(out + b * row, x + (b * S + last) * row, (size_t)row);
                }
                break;
            }
            case P_ROWS_COPY: {
                char* out = at(n.r[0], run);
                const char* x = at(n.r[1], run);
                const int64_t M = i[0], C = i[1], xs = i[2], eb = i[3];
                for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * C * eb, x + m * xs * eb, (size_t)(C * eb));
                break;
            }
            default:
                break;  // cpu_plan.py emits only the ops above
        }
        if (seconds) {
            const clock::time_point t1 = clock::now();
            seconds[node] += std::chrono::duration<double>(t1 - t0).count();
            t0 = t1;
        }
    }
}
