// Data movement that needs no arithmetic: packing dense weights for the GEMM, and embedding rows.
#include "common.h"

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

// out [N, H] = table [ids[n], :] (table row stride ts elements); ids already checked to be in range
void embedding(void* out, const int64_t* ids, const void* table, int64_t N, int64_t H, int64_t ts, int64_t elem_bytes) {
    for (int64_t n = 0; n < N; ++n)
        std::memcpy((char*)out + n * H * elem_bytes, (const char*)table + ids[n] * ts * elem_bytes, (size_t)(H * elem_bytes));
}

const float* f16_table() {
    static const float* table = [] {
        static float t[65536];
        for (uint32_t h = 0; h < 65536; ++h) t[h] = f16_to_f32((uint16_t)h);
        return t;
    }();
    return table;
}
