// Data movement: packing dense weights for the GEMM, and embedding rows (of a table or a prepared weight).
#include <cstring>

#include "common.h"
#include "int8.h"  // the int8 route's repacked panels, which embedding gathers rows from

// P [ceil(N/32)][K][32] = W [N, K] (row stride ws elements), padded with zeros; elem_bytes 2 or 4
void pack_dense(void* packed, const void* w, int64_t N, int64_t K, int64_t ws, int64_t elem_bytes) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
    char* dst = (char*)packed;
    const char* src = (const char*)w;
    std::memset(dst, 0, (size_t)(panels * K * PANEL * elem_bytes));
    for (int64_t n = 0; n < N; ++n) {
        char* panel = dst + (n / PANEL) * K * PANEL * elem_bytes + (n % PANEL) * elem_bytes;
        const char* row = src + n * ws * elem_bytes;
        for (int64_t k = 0; k < K; ++k) std::memcpy(panel + k * PANEL * elem_bytes, row + k * elem_bytes, (size_t)elem_bytes);
    }
}

// out [N, H] = table [ids[n], :] (table row stride ts elements); ids already checked to be in range.
// Copies of more than 64 KiB (prefill) are split into runs of rows across the pool: one core's
// memcpy reached ~0.65x of torch's two-thread gather at 128 x 576 fp32.
struct EmbeddingArgs {
    char* out;
    const int64_t* ids;
    const char* table;
    int64_t N, rows_per_task, row_bytes, table_row_bytes;
};

static void embedding_rows(void* ctx, int64_t task, int) {
    const EmbeddingArgs& a = *(const EmbeddingArgs*)ctx;
    const int64_t n1 = a.N < (task + 1) * a.rows_per_task ? a.N : (task + 1) * a.rows_per_task;
    for (int64_t n = task * a.rows_per_task; n < n1; ++n)
        std::memcpy(a.out + n * a.row_bytes, a.table + a.ids[n] * a.table_row_bytes, (size_t)a.row_bytes);
}

void embedding(void* out, const int64_t* ids, const void* table, int64_t N, int64_t H, int64_t ts, int64_t elem_bytes) {
    const int64_t row_bytes = H * elem_bytes, threads = pool_threads();
    EmbeddingArgs a{(char*)out, ids, (const char*)table, N, N, row_bytes, ts * elem_bytes};
    if (N * row_bytes <= (64 << 10) || threads == 1 || N == 1) {
        embedding_rows(&a, 0, 0);
        return;
    }
    const int64_t tasks = N < 4 * threads ? N : 4 * threads;
    a.rows_per_task = (N + tasks - 1) / tasks;
    parallel_for((N + a.rows_per_task - 1) / a.rows_per_task, embedding_rows, &a);
}

// out [N, H] (dtype dt) = rows ids[n] of a weight prepared for linear (wfmt): dense panels
// [ceil(V/32)][H][32] (pack_dense) or GGUF blocks uint8 [V, H/32 * block bytes], dequantized exactly as
// ggml's get_rows does (fp32: d * q, d * (q - 8), d * q + m), then stored in dt. ids already checked.
// A tied output head is the embedding table this way, and a quantized table is never expanded.
// One K-quant super-block (256 weights; layouts in kquant_impl.h) -> fp32, in ggml's order of
// operations (d sc q - dmin m; Q6_K: d sc (q - 32)): the values of quant.dequantize, exactly.
static void kquant_block_f32(float* y, const uint8_t* b, int wfmt) {
    uint8_t u[256];
    kquant_codes(u, b, wfmt);
    if (wfmt == W_Q6_K) {
        const int8_t* sc = (const int8_t*)(b + 192);
        uint16_t hd;
        std::memcpy(&hd, b + 208, 2);
        const float d = f16_to_f32(hd);
        for (int i = 0; i < 256; ++i) y[i] = d * (float)sc[i / 16] * (float)((int)u[i] - 32);
        return;
    }
    uint16_t hd, hm;
    std::memcpy(&hd, b, 2);
    std::memcpy(&hm, b + 2, 2);
    const float d = f16_to_f32(hd), dmin = f16_to_f32(hm);
    for (int j = 0; j < 8; ++j) {
        int sc, m;
        kquant_scale_min(b + 4, j, &sc, &m);  // 8 x 6-bit scales, 8 x 6-bit mins in 12 bytes
        const float dsc = d * (float)sc, dmn = dmin * (float)m;
        for (int l = 0; l < 32; ++l) y[32 * j + l] = dsc * (float)u[32 * j + l] - dmn;
    }
}

void embedding_prepared(void* out, const int64_t* ids, const void* weights, int64_t N, int64_t H, int wfmt, int dt) {
    const uint8_t* w = (const uint8_t*)weights;
    for (int64_t n = 0; n < N; ++n) {
        const int64_t v = ids[n];
        if (wfmt >= W_INT8) {  // the int8 route's panels of 16 rows: row v's records
            const int fmt = wfmt - W_INT8;
            const uint8_t* p = w + (v / I8_ROWS) * int8_panel_bytes(fmt, H);
            float y[QK];
            for (int64_t b = 0; b < H / QK; ++b) {
                int8_dequant_block(y, 1, p, b, (int)(v % I8_ROWS), fmt);
                for (int i = 0; i < QK; ++i) store_scalar(out, dt, n * H + b * QK + i, y[i]);
            }
            continue;
        }
        if (wfmt == W_Q4_K || wfmt == W_Q5_K || wfmt == W_Q6_K) {  // super-blocks of 256: H % 256 == 0
            const int64_t bb = kquant_block_bytes(wfmt), nb = H / 256;
            float y[256];
            for (int64_t b = 0; b < nb; ++b) {
                kquant_block_f32(y, w + (v * nb + b) * bb, wfmt);
                for (int i = 0; i < 256; ++i) store_scalar(out, dt, n * H + b * 256 + i, y[i]);
            }
            continue;
        }
        if (wfmt == W_F32 || wfmt == W_F16 || wfmt == W_BF16) {  // element k of row v: panel v/32, lane v%32
            const int wdt = wfmt == W_F32 ? DT_F32 : wfmt == W_F16 ? DT_F16 : DT_BF16;
            const int64_t base = (v / PANEL) * H * PANEL + v % PANEL;
            for (int64_t k = 0; k < H; ++k) store_scalar(out, dt, n * H + k, load_scalar(w, wdt, base + k * PANEL));
            continue;
        }
        const int qf = wfmt == W_Q8_0 ? Q8_0 : wfmt == W_Q4_0 ? Q4_0 : Q4_1;
        const int64_t bb = quant_block_bytes(qf);
        const uint8_t* row = w + v * (H / QK) * bb;
        for (int64_t b = 0; b < H / QK; ++b) {
            const uint8_t* blk = row + b * bb;
            uint16_t d16, m16 = 0;
            std::memcpy(&d16, blk, 2);
            const float d = f16_to_f32(d16);
            const int64_t o = n * H + b * QK;
            if (qf == Q8_0) {
                for (int j = 0; j < QK; ++j) store_scalar(out, dt, o + j, d * (float)(int8_t)blk[2 + j]);
            } else if (qf == Q4_0) {
                for (int j = 0; j < QK / 2; ++j) {
                    store_scalar(out, dt, o + j, d * (float)((blk[2 + j] & 0x0F) - 8));
                    store_scalar(out, dt, o + j + QK / 2, d * (float)((blk[2 + j] >> 4) - 8));
                }
            } else {
                std::memcpy(&m16, blk + 2, 2);
                const float m = f16_to_f32(m16);
                for (int j = 0; j < QK / 2; ++j) {
                    store_scalar(out, dt, o + j, d * (float)(blk[4 + j] & 0x0F) + m);
                    store_scalar(out, dt, o + j + QK / 2, d * (float)(blk[4 + j] >> 4) + m);
                }
            }
        }
    }
}

const float* f16_table() {
    static const float* table = [] {
        static float t[65536];
        for (uint32_t h = 0; h < 65536; ++h) t[h] = f16_to_f32((uint16_t)h);
        return t;
    }();
    return table;
}
