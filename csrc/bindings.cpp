// The only file that includes pybind11: the private module portinfer._cpu.
//
// Tensors arrive as (data pointer, bytes) pairs plus sizes and strides from portinfer/backends/cpu.py,
// which validated them against the op contract; nothing is copied on the way in. Every binding checks
// them again here ("checks" below) before a kernel runs, so no call from Python can make a kernel read
// or write outside the buffers it was given. Every kernel runs with the GIL released, under one lock
// (the pool and its scratch buffers serve one kernel at a time).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "plan.h"
#include "int8.h"
#if defined(__x86_64__)
#include "amx.h"
#endif

namespace py = pybind11;

void embedding(void* out, const int64_t* ids, const void* table, int64_t N, int64_t H, int64_t ts, int64_t elem_bytes);
void embedding_prepared(void* out, const int64_t* ids, const void* weights, int64_t N, int64_t H, int wfmt, int dt);

namespace {

std::mutex kernel_lock;

struct Path {
    const char* name;
    const KernelTable* table;
};

// instruction-set paths compiled in and usable on this CPU, best first
std::vector<Path> usable_paths() {
    std::vector<Path> paths;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    // amx: where the tiles are usable (amx.h: the CPU has them, the kernel granted them, the self-check
    // passed), or the software tile unit stands in for them (tests)
    if (amx_vector_isa() && (amx_emulation() || amx_state().bf16))
        paths.push_back({"amx", table_amx()});
    if (avx512 && __builtin_cpu_supports("avx512bf16")) paths.push_back({"avx512bf16", table_avx512bf16()});
    if (avx512) paths.push_back({"avx512", table_avx512()});
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        paths.push_back({"avx2", table_avx2()});
#endif
    paths.push_back({"portable", table_portable()});
    return paths;
}

Path active{nullptr, nullptr};

void select_path(const std::string& name) {
    for (const Path& p : usable_paths())
        if (name == p.name) {
            active = p;
            return;
        }
    std::string names;
    for (const Path& p : usable_paths()) names += std::string(names.empty() ? "" : ", ") + p.name;
    std::string why;
#if defined(__x86_64__)
    if (name == "amx") why = " (amx needs AMX tiles this process may use and AVX512-BF16; AMX here: " + amx_state().status + ")";
#endif
    throw py::value_error("simd: expected one of the paths usable on this CPU (" + names + "), got '" + name + "'" + why);
}

const KernelTable& kernels() {
    if (!active.table) {
        const char* env = std::getenv("PORTINFER_CPU_SIMD");
        if (env && *env) select_path(env);
        else active = usable_paths().front();
    }
    return *active.table;
}

// ---- int8 route (int8.h): its own path list, since the VNNI paths need more than the kernel
// table's instruction sets. Default: the best usable path within the active kernel path's
// extensions (forcing simd=portable also makes the int8 route portable); set_int8_path or
// PORTINFER_CPU_INT8_PATH choose one; a path this CPU lacks is refused.
struct Int8Path {
    const char* name;
    const Int8Kernels* kernels;
    bool usable;
    const char* needs;
    bool amx = false;  // needs ends with the AMX status (amx.h)
};

std::vector<Int8Path> int8_paths_compiled() {
    std::vector<Int8Path> paths;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool vnni512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    // amx: the AVX512-VNNI kernels for 1-3 rows of x, tiles for more; needs what the amx kernel path needs
    paths.push_back({"amx", int8_kernels_amx(),
                     amx_vector_isa() && (amx_emulation() || amx_state().int8),
                     "AMX tiles this process may use (AMX here: ", true});
    paths.push_back({"avx512vnni", int8_kernels_avx512vnni(), vnni512, "AVX512F, AVX512BW, AVX512VL and AVX512-VNNI"});
    paths.push_back({"avxvnni", int8_kernels_avxvnni(), avx2 && __builtin_cpu_supports("avxvnni"),
                     "AVX2, FMA, F16C and AVX-VNNI"});
    paths.push_back({"avx2", int8_kernels_avx2(), avx2, "AVX2, FMA and F16C"});
#endif
    paths.push_back({"portable", int8_kernels_portable(), true, "nothing"});
    return paths;
}

const Int8Kernels* int8_active = nullptr;
bool int8_prefill = false;  // M > I8_DECODE_MAX_M on int8 activations too (set_int8_prefill; benchmarks and tests)

std::string int8_usable_names() {
    std::string names;
    for (const Int8Path& p : int8_paths_compiled())
        if (p.usable) names += std::string(names.empty() ? "" : ", ") + p.name;
    return names;
}

void select_int8_path(const std::string& name) {
    for (const Int8Path& p : int8_paths_compiled())
        if (name == p.name) {
            if (!p.usable) {
                std::string needs = p.needs;
#if defined(__x86_64__)
                if (p.amx) needs += amx_state().status + ")";
#endif
                throw py::value_error("int8 path '" + name + "': needs a CPU with " + needs +
                                      ", which this one lacks; usable here: " + int8_usable_names());
            }
            int8_active = p.kernels;
            return;
        }
    throw py::value_error("int8 path: expected one of the paths usable on this CPU (" + int8_usable_names() +
                          "), got '" + name + "'");
}

const Int8Kernels* int8_kernels() {
    if (!int8_active) {
        const char* env = std::getenv("PORTINFER_CPU_INT8_PATH");
        if (env && *env) {
            select_int8_path(env);
        } else {
            kernels();
            const bool portable_only = std::string(active.name) == "portable";
            for (const Int8Path& p : int8_paths_compiled())
                if (p.usable && (!portable_only || std::string(p.name) == "portable")) {
                    int8_active = p.kernels;
                    break;
                }
        }
    }
    return int8_active;
}

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// linear on weights repacked for the int8 route (the binding and the step plans' int8 linear node);
// the caller holds kernel_lock
void run_linear_int8(void* out, const void* x, const void* packed, const void* bias, int64_t M, int64_t N, int64_t K,
                     int64_t xs, int adt, int fmt, int mode) {
    const Int8Kernels* k = int8_kernels();
    const KernelTable& t = kernels();
    // prefill (M > 16): the GEMM is compute-bound, where int8 activations bought no speed here
    // but cost accuracy: fp32 activations on the same repacked weights. A decode step of up to 16
    // sequences (a server's batch) stays on the integer kernels, chunks of 4 rows over weights kept
    // in cache: the GEMM dequantizes every tile, which made a step of 8 rows ~3x slower than this.
    // mode 2 (the cpu[int8-all] route) takes int8 activations for every M: with the panel kernels
    // a prefill GEMM 2.0-2.7x faster on a Zen 5, for ~3.5e-2 (not ~3e-6) of error in SmolLM2's
    // prompt logits
    if (M > I8_DECODE_MAX_M && !int8_prefill && mode != 2) {
        t.linear(out, x, packed, bias, M, N, K, xs, adt, W_INT8 + fmt);
        return;
    }
    linear_int8(k, out, x, (const uint8_t*)packed, bias, M, N, K, xs, adt, fmt);
}

// ---------------------------------------------------------------------------- checks
// Every binding, and every node a step plan is given, is checked here before a kernel runs: Python
// validated the same things (spec.py, cpu.py, cpu_plan.py), and these make the module itself safe to
// call with anything -- a mutated handle, a resized tensor, a size that does not match its buffer, a
// stale offset is a ValueError naming the argument, never a read or write out of bounds.
//   Buf: (data pointer, bytes the buffer holds from that pointer on) -- cpu.py's _buf(tensor)
//   need(op, name, buf, bytes): a non-null buffer that holds at least `bytes`
//   span(op, name, elem_bytes, {sizes}, {strides}): bytes a strided view touches, overflow-checked
//   weight_bytes(op, wfmt, N, K): bytes of linear's weights in a format
//   node_extents(op code, ints): what one kernel call reads and writes, per buffer (bindings and plans)
using Buf = std::pair<uintptr_t, int64_t>;

[[noreturn]] void fail(const std::string& op, const std::string& message) {
    throw py::value_error(op + ": " + message);
}

int64_t mul(const std::string& op, int64_t a, int64_t b) {
    int64_t r;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) fail(op, "a size product overflows 64 bits");
    return r;
}

int64_t add(const std::string& op, int64_t a, int64_t b) {
    int64_t r;
    if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) fail(op, "a size sum overflows 64 bits");
    return r;
}

int64_t positive(const std::string& op, const char* name, int64_t v) {
    if (v < 1) fail(op, std::string(name) + ": expected a size >= 1, got " + std::to_string(v));
    return v;
}

int64_t dtype_bytes_checked(const std::string& op, const char* name, int64_t dt) {
    if (dt != DT_F32 && dt != DT_F16 && dt != DT_BF16)
        fail(op, std::string(name) + ": expected a dtype code 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                     std::to_string(dt));
    return dtype_bytes((int)dt);
}

int64_t elem_bytes_checked(const std::string& op, const char* name, int64_t eb) {
    if (eb != 2 && eb != 4) fail(op, std::string(name) + ": expected element bytes 2 or 4, got " + std::to_string(eb));
    return eb;
}

// bytes a view [sizes] with element strides [strides] touches: elem * (1 + sum (size_i - 1) * stride_i)
int64_t span(const std::string& op, const char* name, int64_t elem_bytes, std::initializer_list<int64_t> sizes,
             std::initializer_list<int64_t> strides) {
    int64_t last = 0;
    auto st = strides.begin();
    for (int64_t size : sizes) {
        positive(op, name, size);
        if (*st < 0) fail(op, std::string(name) + ": expected strides >= 0, got " + std::to_string(*st));
        last = add(op, last, mul(op, size - 1, *st));
        ++st;
    }
    return mul(op, add(op, last, 1), elem_bytes);
}

void need(const std::string& op, const char* name, const Buf& buf, int64_t bytes) {
    if (buf.first == 0) fail(op, std::string(name) + ": null buffer");
    if (buf.second < bytes)
        fail(op, std::string(name) + ": the call needs " + std::to_string(bytes) + " bytes, the buffer holds " +
                     std::to_string(buf.second) + " (sizes or strides do not match the tensor)");
}

// an int8-route format code (common.h QFormat), or a ValueError
int64_t int8_format_checked(const std::string& op, int64_t fmt) {
    if (!int8_format_valid(fmt))
        fail(op, "int8 format code: expected 0 (Q8_0), 1 (Q4_0), 2 (Q4_1), 3 (Q6_K), 4 (Q4_K) or 5 (Q5_K), got " +
                     std::to_string(fmt));
    return fmt;
}

// bytes of linear's weights in format wfmt (common.h WeightFormat) for [N, K]
int64_t weight_bytes(const std::string& op, int64_t wfmt, int64_t N, int64_t K) {
    positive(op, "N", N);
    positive(op, "K", K);
    if (wfmt == W_F32 || wfmt == W_F16 || wfmt == W_BF16)  // pack_dense panels [ceil(N/PANEL)][K][PANEL]
        return mul(op, mul(op, (N + PANEL - 1) / PANEL, mul(op, K, PANEL)), dtype_bytes((int)wfmt));
    if (wfmt == W_Q8_0 || wfmt == W_Q4_0 || wfmt == W_Q4_1) {  // GGUF blocks [N][K/32]
        if (K % QK) fail(op, "K = " + std::to_string(K) + " is not a whole number of 32-weight blocks");
        return mul(op, N, mul(op, K / QK, quant_block_bytes((int)wfmt - W_Q8_0)));
    }
    if (wfmt == W_Q4_K || wfmt == W_Q5_K || wfmt == W_Q6_K) {  // K-quant super-blocks [N][K/256]
        if (K % QK_K) fail(op, "K = " + std::to_string(K) + " is not a whole number of 256-weight super-blocks");
        return mul(op, N, mul(op, K / QK_K, kquant_block_bytes((int)wfmt)));
    }
    if (wfmt >= W_INT8 && int8_format_valid(wfmt - W_INT8)) {  // int8_repack panels of I8_ROWS rows
        if (K % QK) fail(op, "K = " + std::to_string(K) + " is not a whole number of 32-weight blocks");
        if (wfmt - W_INT8 >= Q6_K && K % QK_K)  // the K-quants' panels: whole super-blocks
            fail(op, "K = " + std::to_string(K) + " is not a whole number of 256-weight super-blocks");
        return mul(op, (N + I8_ROWS - 1) / I8_ROWS, int8_panel_bytes((int)(wfmt - W_INT8), K));
    }
    fail(op, "weight format code: expected 0..8 (common.h WeightFormat) or 16..21 (int8 route), got " +
                 std::to_string(wfmt));
}

// What one kernel call touches, per buffer, for a plan op code (plan.h PlanOp) and its ints -- the
// same ints a plan node carries; each binding fills them from its arguments. The sizes are checked
// on the way (a ValueError naming the size). bytes[r]: bytes buffer r is read or written from its
// pointer on. cache_row[r] > 0: buffer r may be (for P_KV_WRITE: must be) KV-cache rows of
// cache_row bytes per position; a cache ref then needs (row0 + rows) * cache_row * T bytes at run
// time instead (cached_kv: attention's keys and values are cache rows, and plan.cpp takes the key
// count and strides from T, not from the ints).
struct Extents {
    int refs = 0;              // buffers the op takes
    const char* names[6] = {};
    int64_t bytes[6] = {};
    int64_t cache_row[6] = {};
    int64_t rows = 0;          // cache rows one call touches (its batch)
    bool optional[6] = {};     // may be absent (linear's bias)
};

const char* plan_op_name(int64_t code) {
    static const char* names[] = {"embedding", "rms_norm", "linear", "rope", "silu_mul", "attention", "add",
                                  "kv_write", "merge_heads", "last_rows", "gelu", "layer_norm", "rows_copy"};
    return code >= P_EMBEDDING && code <= P_ROWS_COPY ? names[code] : "unknown op";
}

Extents node_extents(const std::string& op, int64_t code, const int64_t* i, bool cached_kv = false) {
    Extents e;
    auto set = [&](int r, const char* name, int64_t bytes) {
        e.names[r] = name;
        e.bytes[r] = bytes;
        if (r + 1 > e.refs) e.refs = r + 1;
    };
    switch (code) {
        case P_EMBEDDING: {  // [N, H, ts, eb, -1 | wfmt, dt, V]: out [N, H], ids int64 [N], table [V, H] or weights
            const int64_t N = positive(op, "N", i[0]), H = positive(op, "H", i[1]), V = positive(op, "V", i[6]);
            set(1, "ids", mul(op, N, 8));
            if (i[4] < 0) {
                const int64_t eb = elem_bytes_checked(op, "elem_bytes", i[3]);
                set(0, "out", span(op, "out", eb, {N, H}, {H, 1}));
                set(2, "table", span(op, "table", eb, {V, H}, {i[2], 1}));
            } else {  // rows of a prepared weight [V, H]: panels or blocks (layout.cpp embedding_prepared)
                if (i[4] > W_Q6_K && !(i[4] >= W_INT8 && int8_format_valid(i[4] - W_INT8)))
                    fail(op, "weight format code: expected 0..8 (dense panels, GGUF blocks or K-quant super-blocks) "
                             "or 16..21 (the int8 route's panels), got " + std::to_string(i[4]));
                set(0, "out", span(op, "out", dtype_bytes_checked(op, "dtype", i[5]), {N, H}, {H, 1}));
                set(2, "weights", weight_bytes(op, i[4], V, H));
            }
            return e;
        }
        case P_RMS_NORM:
        case P_LAYER_NORM: {  // [M, H, xs, dt]: out [M, H], x [M, H] row stride xs, weight [H] (, bias [H])
            const int64_t eb = dtype_bytes_checked(op, "dtype", i[3]);
            set(0, "out", span(op, "out", eb, {i[0], i[1]}, {i[1], 1}));
            set(1, "x", span(op, "x", eb, {i[0], i[1]}, {i[2], 1}));
            set(2, "weight", span(op, "weight", eb, {i[1]}, {1}));
            if (code == P_LAYER_NORM) set(3, "bias", span(op, "bias", eb, {i[1]}, {1}));
            return e;
        }
        case P_LINEAR: {  // [M, N, K, xs, adt, wfmt | int8 fmt, int8]: out [M, N], x [M, K], weights, bias [N]
            // int8: 0 (weights of wfmt), 1 (int8 route: prefill on fp32 activations), 2 (int8 for every M)
            const int64_t eb = dtype_bytes_checked(op, "activation dtype", i[4]);
            if (i[6] < 0 || i[6] > 2)
                throw py::value_error(op + ": int8 mode: expected 0 (none), 1 (decode rows) or 2 (every row), got " +
                                      std::to_string(i[6]));
            if (i[6]) int8_format_checked(op, i[5]);
            set(0, "out", span(op, "out", eb, {i[0], i[1]}, {i[1], 1}));
            set(1, "x", span(op, "x", eb, {i[0], i[2]}, {i[3], 1}));
            set(2, "weights", weight_bytes(op, i[6] ? W_INT8 + i[5] : i[5], i[1], i[2]));
            set(3, "bias", span(op, "bias", eb, {i[1]}, {1}));
            e.optional[3] = true;
            return e;
        }
        case P_ROPE: {  // [B, H, S, D, rd, sb, sh, ss, interleaved, dt]: out, x [B, H, S, D], pos [B, S], inv_freq
            const int64_t eb = dtype_bytes_checked(op, "dtype", i[9]), B = i[0], H = i[1], S = i[2], D = i[3];
            if (i[4] < 2 || i[4] % 2 || i[4] > D)
                fail(op, "rotary_dim: expected an even number in 2..D = " + std::to_string(D) + ", got " +
                             std::to_string(i[4]));
            set(0, "out", span(op, "out", eb, {B, H, S, D}, {mul(op, mul(op, H, S), D), mul(op, S, D), D, 1}));
            set(1, "x", span(op, "x", eb, {B, H, S, D}, {i[5], i[6], i[7], 1}));
            set(2, "pos", span(op, "pos", 8, {B, S}, {S, 1}));
            set(3, "inv_freq", mul(op, i[4] / 2, 8));
            return e;
        }
        case P_SILU_MUL: {  // [M, I, xs, dt]: out [M, I], x [M, 2I] row stride xs
            const int64_t eb = dtype_bytes_checked(op, "dtype", i[3]);
            set(0, "out", span(op, "out", eb, {i[0], i[1]}, {i[1], 1}));
            set(1, "x", span(op, "x", eb, {i[0], mul(op, positive(op, "I", i[1]), 2)}, {i[2], 1}));
            return e;
        }
        case P_GELU: {  // [M, C, xs, tanh, dt]: out [M, C], x [M, C] row stride xs
            const int64_t eb = dtype_bytes_checked(op, "dtype", i[4]);
            set(0, "out", span(op, "out", eb, {i[0], i[1]}, {i[1], 1}));
            set(1, "x", span(op, "x", eb, {i[0], i[1]}, {i[2], 1}));
            return e;
        }
        case P_ATTENTION: {  // [B, Hq, Hkv, Sq, Sk, D, q strides 3, k strides 3, v strides 3, causal, dt, k/v dt]
            const int64_t eb = dtype_bytes_checked(op, "dtype", i[16]), kveb = dtype_bytes_checked(op, "kv dtype", i[17]);
            const int64_t B = i[0], Hq = i[1], Hkv = i[2], Sq = i[3], Sk = i[4], D = i[5];
            if (positive(op, "Hq", Hq) % positive(op, "Hkv", Hkv))
                fail(op, "Hq = " + std::to_string(Hq) + " must be a multiple of Hkv = " + std::to_string(Hkv));
            set(0, "out", span(op, "out", eb, {B, Hq, Sq, D}, {mul(op, mul(op, Hq, Sq), D), mul(op, Sq, D), D, 1}));
            set(1, "q", span(op, "q", eb, {B, Hq, Sq, D}, {i[6], i[7], i[8], 1}));
            if (cached_kv) {  // the run's cache rows: the key count and strides in the ints are unused
                set(2, "k", 0);
                set(3, "v", 0);
                positive(op, "B", B);
                positive(op, "D", D);
            } else {
                set(2, "k", span(op, "k", kveb, {B, Hkv, Sk, D}, {i[9], i[10], i[11], 1}));
                set(3, "v", span(op, "v", kveb, {B, Hkv, Sk, D}, {i[12], i[13], i[14], 1}));
            }
            set(4, "q_pos", mul(op, B, 4));
            set(5, "kv_len", mul(op, B, 4));
            e.cache_row[2] = e.cache_row[3] = mul(op, mul(op, Hkv, D), kveb);
            e.rows = B;
            return e;
        }
        case P_ADD: {  // [n, dt]: out, a, b [n] contiguous
            const int64_t bytes = mul(op, positive(op, "n", i[0]), dtype_bytes_checked(op, "dtype", i[1]));
            set(0, "out", bytes);
            set(1, "a", bytes);
            set(2, "b", bytes);
            return e;
        }
        case P_KV_WRITE: {  // [B, Hkv, S, D, k strides 3, v strides 3, dt, cache dt]: cache k, cache v, k, v [B, Hkv, S, D]
            const int64_t eb = dtype_bytes_checked(op, "dtype", i[10]), ceb = dtype_bytes_checked(op, "cache dtype", i[11]);
            const int64_t B = i[0], Hkv = i[1], S = i[2], D = i[3];
            set(0, "k cache", 0);
            set(1, "v cache", 0);
            set(2, "k", span(op, "k", eb, {B, Hkv, S, D}, {i[4], i[5], i[6], 1}));
            set(3, "v", span(op, "v", eb, {B, Hkv, S, D}, {i[7], i[8], i[9], 1}));
            set(4, "q_pos", mul(op, B, 4));
            set(5, "kv_len", mul(op, B, 4));
            e.cache_row[0] = e.cache_row[1] = mul(op, mul(op, Hkv, D), ceb);
            e.rows = B;
            return e;
        }
        case P_MERGE_HEADS: {  // [B, H, S, D, eb]: out [B, S, H, D], x [B, H, S, D], both contiguous
            const int64_t bytes = span(op, "x", elem_bytes_checked(op, "elem_bytes", i[4]), {i[0], i[1], i[2], i[3]},
                                       {mul(op, mul(op, i[1], i[2]), i[3]), mul(op, i[2], i[3]), i[3], 1});
            set(0, "out", bytes);
            set(1, "x", bytes);
            return e;
        }
        case P_LAST_ROWS: {  // [B, S, C, eb]: out [B, C], x [B*S, C], q_pos, kv_len int32 [B]
            const int64_t eb = elem_bytes_checked(op, "elem_bytes", i[3]);
            set(0, "out", span(op, "out", eb, {i[0], i[2]}, {i[2], 1}));
            set(1, "x", span(op, "x", eb, {mul(op, positive(op, "B", i[0]), positive(op, "S", i[1])), i[2]}, {i[2], 1}));
            set(2, "q_pos", mul(op, i[0], 4));
            set(3, "kv_len", mul(op, i[0], 4));
            return e;
        }
        case P_ROWS_COPY: {  // [M, C, xs, eb]: out [M, C] contiguous, x [M, C] row stride xs
            const int64_t eb = elem_bytes_checked(op, "elem_bytes", i[3]);
            set(0, "out", span(op, "out", eb, {i[0], i[1]}, {i[1], 1}));
            set(1, "x", span(op, "x", eb, {i[0], i[1]}, {i[2], 1}));
            return e;
        }
        default:
            fail(op, "unknown plan op code " + std::to_string(code));
    }
}

// a binding's buffers against node_extents (no cache rows outside plans)
void need_all(const std::string& op, const Extents& e, std::initializer_list<Buf> bufs) {
    int r = 0;
    for (const Buf& b : bufs) {
        if (!(e.optional[r] && b.first == 0)) need(op, e.names[r], b, e.bytes[r]);
        ++r;
    }
}

// per-row values the kernels index with: q_pos >= 0 and kv_len in [0, Sk] (attention reads keys
// [0, kv_len)); new_max >= 0: kv_len - q_pos <= new_max as well (a KV write copies that many of
// its S new keys; last_rows reads row kv_len - q_pos - 1 of S)
void check_rows(const std::string& op, const int32_t* q_pos, const int32_t* kv_len, int64_t B, int64_t Sk,
                int64_t new_max) {
    for (int64_t b = 0; b < B; ++b) {
        if (q_pos[b] < 0)
            fail(op, "q_pos: expected positions >= 0, got " + std::to_string(q_pos[b]) + " in row " + std::to_string(b));
        if (kv_len[b] < 0 || kv_len[b] > Sk)
            fail(op, "kv_len: expected values in [0, " + std::to_string(Sk) + "] (the keys there are), got " +
                         std::to_string(kv_len[b]) + " in row " + std::to_string(b));
        if (new_max >= 0 && (kv_len[b] < q_pos[b] || kv_len[b] - q_pos[b] > new_max))
            fail(op, "kv_len - q_pos: expected 0.." + std::to_string(new_max) + " new tokens, got " +
                         std::to_string((int64_t)kv_len[b] - q_pos[b]) + " in row " + std::to_string(b));
    }
}

void check_ids(const std::string& op, const int64_t* ids, int64_t N, int64_t V) {
    for (int64_t n = 0; n < N; ++n)
        if (ids[n] < 0 || ids[n] >= V)
            fail(op, "ids: expected every id in [0, " + std::to_string(V) + "), got " + std::to_string(ids[n]));
}

// ---------------------------------------------------------------------------- step plans
// A compiled step plan (plan.h): its nodes and its pointer table. The first `dynamic` slots are
// rebound by every run (step inputs, then KV-cache layers); the rest are fixed when the plan is built
// and carry their sizes. What is checked, and when:
//   add():  each node's ints (sizes, strides, dtype / format codes) as the bindings check them; every
//           ref names a slot of the table (only linear's bias may be absent) at an offset >= 0; a ref
//           into a fixed slot must hold the node's whole extent (node_extents) inside that slot's
//           bytes; a cache ref (attention's keys and values, a KV write's cache) must be in a dynamic
//           slot with the node's own bytes per position (Hkv * D * element bytes).
//   run():  the number of dynamic slots; each dynamic slot's bytes against the largest extent any
//           node needs from it; cache slots against (row0 + rows) * bytes per position * T, with
//           row0 >= 0 and T >= 1; the values kernels index with, read before the step: every id of
//           an embedding below its table's rows, q_pos >= 0, kv_len <= the keys there are (T for
//           the cache, Sk otherwise), kv_len - q_pos <= the new tokens a KV write or last-rows node
//           has (each check once per run, not once per layer).
// Not checked: that nodes read what earlier nodes wrote (the compiler's order), and values that
// are only written during the step.
struct CacheNeed {  // a cache ref: bytes offset + (row0 + rows) * row_bytes * T of its slot
    int64_t slot, offset, rows, row_bytes;
    bool operator==(const CacheNeed& o) const {
        return slot == o.slot && offset == o.offset && rows == o.rows && row_bytes == o.row_bytes;
    }
};

struct RowsCheck {  // check_rows on the values at q_pos / kv_len; Sk < 0: the run's T
    PlanRef q_pos, kv_len;
    int64_t B, Sk, new_max;
    const char* op;
    bool operator==(const RowsCheck& o) const {
        return q_pos.slot == o.q_pos.slot && q_pos.offset == o.q_pos.offset && kv_len.slot == o.kv_len.slot &&
               kv_len.offset == o.kv_len.offset && B == o.B && Sk == o.Sk && new_max == o.new_max;
    }
};

struct IdsCheck {  // an embedding's ids below its table's rows
    PlanRef ids;
    int64_t N, V;
    bool operator==(const IdsCheck& o) const {
        return ids.slot == o.ids.slot && ids.offset == o.ids.offset && N == o.N && V == o.V;
    }
};

template <class T>
void push_unique(std::vector<T>& v, const T& x) {
    for (const T& y : v)
        if (y == x) return;
    v.push_back(x);
}

struct PlanProgram {
    std::vector<PlanNode> nodes;
    std::vector<uintptr_t> slots;
    std::vector<int64_t> slot_bytes;    // fixed slots: bytes from the pointer; dynamic: set by run
    size_t dynamic = 0;
    std::vector<int64_t> dynamic_need;  // per dynamic slot: bytes its non-cache refs need
    std::vector<CacheNeed> cache_needs;
    std::vector<RowsCheck> rows_checks;
    std::vector<IdsCheck> ids_checks;
    std::vector<double> seconds;  // per node, accumulated by runs with profile=True
};

void plan_add(PlanProgram& p, int64_t code, const std::vector<std::vector<int64_t>>& refs,
              const std::vector<int64_t>& ints, float f) {
    const std::string op = "plan node " + std::to_string(p.nodes.size()) + " (" + plan_op_name(code) + ")";
    if (code < P_EMBEDDING || code > P_ROWS_COPY) fail(op, "unknown op code " + std::to_string(code));
    if (ints.size() > 20) fail(op, "at most 20 ints, got " + std::to_string(ints.size()));
    PlanNode n;
    n.op = (int)code;
    for (size_t j = 0; j < ints.size(); ++j) n.i[j] = ints[j];
    n.f = f;
    const bool cached_kv = code == P_ATTENTION && refs.size() == 6 && refs[2].size() == 3 && refs[2][2] != 0;
    const Extents e = node_extents(op, code, n.i, cached_kv);
    if ((int)refs.size() != e.refs)
        fail(op, "expected " + std::to_string(e.refs) + " refs, got " + std::to_string(refs.size()));
    const int64_t nslots = (int64_t)p.slots.size(), dyn = (int64_t)p.dynamic;
    for (int r = 0; r < e.refs; ++r) {
        const std::string name = e.names[r];
        if (refs[r].size() != 3) fail(op, name + ": a ref is (slot, offset, cache row bytes)");
        const PlanRef ref{refs[r][0], refs[r][1], refs[r][2]};
        n.r[r] = ref;
        if (ref.slot == -1 && e.optional[r]) continue;
        if (ref.slot < 0 || ref.slot >= nslots)
            fail(op, name + ": slot " + std::to_string(ref.slot) + " out of range [0, " + std::to_string(nslots) + ")");
        if (ref.offset < 0) fail(op, name + ": expected a byte offset >= 0, got " + std::to_string(ref.offset));
        if (ref.cache != 0) {
            if (e.cache_row[r] == 0) fail(op, name + ": cannot be KV-cache rows");
            if (ref.slot >= dyn) fail(op, name + ": KV-cache rows must be in a dynamic slot");
            if (ref.cache != e.cache_row[r])
                fail(op, name + ": cache rows of " + std::to_string(ref.cache) + " bytes per position, the node's " +
                             "sizes give " + std::to_string(e.cache_row[r]));
            push_unique(p.cache_needs, CacheNeed{ref.slot, ref.offset, e.rows, ref.cache});
            continue;
        }
        if (code == P_KV_WRITE && r < 2) fail(op, name + ": expected KV-cache rows (cache row bytes > 0)");
        const int64_t end = add(op, ref.offset, e.bytes[r]);
        if (ref.slot >= dyn) {
            const int64_t held = p.slot_bytes[(size_t)ref.slot];
            if (end > held)
                fail(op, name + ": needs bytes [" + std::to_string(ref.offset) + ", " + std::to_string(end) +
                             ") of slot " + std::to_string(ref.slot) + ", which holds " + std::to_string(held));
        } else if (end > p.dynamic_need[(size_t)ref.slot]) {
            p.dynamic_need[(size_t)ref.slot] = end;
        }
    }
    if (code == P_ATTENTION) {
        const bool cached = n.r[2].cache != 0;
        if (cached != (n.r[3].cache != 0)) fail(op, "k and v: both KV-cache rows or neither");
        push_unique(p.rows_checks, RowsCheck{n.r[4], n.r[5], n.i[0], cached ? -1 : n.i[4], -1, "attention"});
    } else if (code == P_KV_WRITE) {
        push_unique(p.rows_checks, RowsCheck{n.r[4], n.r[5], n.i[0], -1, n.i[2], "kv_write"});
    } else if (code == P_LAST_ROWS) {
        push_unique(p.rows_checks, RowsCheck{n.r[2], n.r[3], n.i[0], INT32_MAX, n.i[1], "last_rows"});
    } else if (code == P_EMBEDDING) {
        push_unique(p.ids_checks, IdsCheck{n.r[1], n.i[0], n.i[6]});
    }
    p.nodes.push_back(n);
}

template <class T>
const T* plan_at(const PlanProgram& p, const PlanRef& r) {
    return reinterpret_cast<const T*>(p.slots[(size_t)r.slot] + (uintptr_t)r.offset);
}

void plan_check_run(PlanProgram& p, const std::vector<Buf>& dynamic, int64_t row0, int64_t T) {
    const std::string op = "plan run";
    if (dynamic.size() != p.dynamic)
        fail(op, "expected " + std::to_string(p.dynamic) + " step buffers, got " + std::to_string(dynamic.size()));
    for (size_t j = 0; j < dynamic.size(); ++j) {
        if (p.dynamic_need[j] > 0 || dynamic[j].first != 0) {
            const std::string name = "step buffer " + std::to_string(j);
            need(op, name.c_str(), dynamic[j], p.dynamic_need[j]);
        }
        p.slots[j] = dynamic[j].first;
        p.slot_bytes[j] = dynamic[j].second;
    }
    if (!p.cache_needs.empty()) {
        if (row0 < 0) fail(op, "row0: expected the first cache row >= 0, got " + std::to_string(row0));
        if (T < 1 || T > INT32_MAX) fail(op, "T: expected the cache's positions in 1..2^31-1, got " + std::to_string(T));
        for (const CacheNeed& c : p.cache_needs) {
            const std::string name = "KV-cache slot " + std::to_string(c.slot);
            const int64_t bytes = add(op, c.offset, mul(op, mul(op, add(op, row0, c.rows), c.row_bytes), T));
            need(op, name.c_str(), dynamic[(size_t)c.slot], bytes);
        }
    }
    for (const RowsCheck& c : p.rows_checks)
        check_rows(op + " (" + c.op + ")", plan_at<int32_t>(p, c.q_pos), plan_at<int32_t>(p, c.kv_len), c.B,
                   c.Sk < 0 ? T : c.Sk, c.new_max);
    for (const IdsCheck& c : p.ids_checks) check_ids(op + " (embedding)", plan_at<int64_t>(p, c.ids), c.N, c.V);
}
}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "portinfer cpu backend kernels (see csrc/)";

    m.def("simd_paths", [] {
        std::vector<std::string> names;
        for (const Path& p : usable_paths()) names.push_back(p.name);
        return names;
    }, "instruction-set paths usable on this CPU, best first");
    m.def("get_simd", [] { kernels(); return std::string(active.name); });
    m.def("amx_status", [] {
        py::dict d;
#if defined(__x86_64__)
        const AmxState& s = amx_state();
        d["status"] = s.status;
        d["bf16"] = s.bf16;
        d["int8"] = s.int8;
        d["emulation"] = amx_emulation();
#else
        d["status"] = std::string("absent: not an x86-64 build");
        d["bf16"] = d["int8"] = d["emulation"] = false;
#endif
        return d;
    }, "whether the AMX tiles are usable here (asked once: amx.h), and whether the software tile unit stands in");
#if defined(__x86_64__)
    m.def("set_amx_emulation", [](bool on) {
        std::lock_guard<std::mutex> lock(kernel_lock);
        amx_set_emulation(on);
    }, "the amx paths on the software tile unit (tests: any AVX512-BF16 / AVX512-VNNI CPU)");
    m.def("bf16_dot_peak", [](int64_t iters) {
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512f"))
            throw py::value_error("bf16_dot_peak: needs a CPU with AVX512-BF16, which this one lacks");
        if (iters < 1) throw py::value_error("bf16_dot_peak: iters must be >= 1, got " + std::to_string(iters));
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        return bf16_dot_peak_flops(iters);
    }, py::arg("iters"), "vdpbf16ps' register-only ceiling (benchmarks): every pool thread runs iters rounds of 24 "
       "chains; returns the flops done");
    m.def("_amx_request_permission", [] { return amx_request_permission(); },
          "the arch_prctl request itself, asked whatever the CPU reports: '' granted, else the refusal (tests)");
    // the self-check's own answers come from AVX512-BF16 / AVX512-VNNI code (the software tile unit's
    // epilogues): refused, not run, on a CPU without them
    auto selfcheck_cpu = [](const char* op) {
        if (!amx_vector_isa())
            throw py::value_error(std::string(op) + ": needs a CPU with AVX512-BF16 and AVX512-VNNI, which this one lacks");
    };
    m.def("_amx_selfcheck_forked", [selfcheck_cpu] {
        selfcheck_cpu("_amx_selfcheck_forked");
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        return amx_selfcheck_forked();
    }, "the self-check on the hardware tiles in a forked child: '' agreed, else why not (tests)");
    m.def("_amx_selfcheck_reference", [selfcheck_cpu] {
        selfcheck_cpu("_amx_selfcheck_reference");
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        return amx_selfcheck_run(false);
    }, "the self-check's comparison with the avx512vnni / avx512bf16 kernels in place of the tiles: 0 agree (tests)");
#endif
    m.def("set_simd", [](const std::string& name) {
        std::lock_guard<std::mutex> lock(kernel_lock);
        select_path(name);
        int8_active = nullptr;  // the int8 route follows the kernel path again
    });
    m.def("get_num_threads", [] { return pool_threads(); });
    m.def("default_num_threads", [] { return default_threads(); });
    m.def("set_num_threads", [](int n) {
        if (n < 1) throw py::value_error("threads: expected an integer >= 1, got " + std::to_string(n));
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        pool_set_threads(n);
    });

    m.def("pack_dense", [](Buf packed, Buf w, int64_t N, int64_t K, int64_t ws, int64_t elem_bytes) {
        const std::string op = "pack_dense";
        const int64_t eb = elem_bytes_checked(op, "elem_bytes", elem_bytes);
        need(op, "packed", packed, weight_bytes(op, eb == 4 ? W_F32 : W_F16, N, K));
        need(op, "w", w, span(op, "w", eb, {N, K}, {ws, 1}));
        py::gil_scoped_release release;
        pack_dense(ptr<void>(packed.first), ptr<const void>(w.first), N, K, ws, eb);
    });
    m.def("embedding", [](Buf out, Buf ids, Buf table, int64_t N, int64_t H, int64_t V, int64_t ts, int64_t eb) {
        const std::string op = "embedding";
        const int64_t i[20] = {N, H, ts, eb, -1, 0, V};
        need_all(op, node_extents(op, P_EMBEDDING, i), {out, ids, table});
        check_ids(op, ptr<const int64_t>(ids.first), N, V);
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);  // it may run on the pool
        embedding(ptr<void>(out.first), ptr<const int64_t>(ids.first), ptr<const void>(table.first), N, H, ts, eb);
    });
    m.def("embedding_prepared", [](Buf out, Buf ids, Buf w, int64_t N, int64_t H, int64_t V, int wfmt, int dt) {
        const std::string op = "embedding_prepared";
        if (wfmt < W_F32) fail(op, "weight format code: expected 0..8 or 16..21, got " + std::to_string(wfmt));
        const int64_t i[20] = {N, H, 0, 0, wfmt, dt, V};
        need_all(op, node_extents(op, P_EMBEDDING, i), {out, ids, w});
        check_ids(op, ptr<const int64_t>(ids.first), N, V);
        py::gil_scoped_release release;
        embedding_prepared(ptr<void>(out.first), ptr<const int64_t>(ids.first), ptr<const void>(w.first), N, H, wfmt,
                           dt);
    });
    m.def("rms_norm", [](Buf out, Buf x, Buf w, int64_t M, int64_t H, int64_t xs, float eps, int dt) {
        const std::string op = "rms_norm";
        const int64_t i[20] = {M, H, xs, dt};
        need_all(op, node_extents(op, P_RMS_NORM, i), {out, x, w});
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.rms_norm(ptr<void>(out.first), ptr<const void>(x.first), ptr<const void>(w.first), M, H, xs, eps, dt);
    });
    m.def("layer_norm", [](Buf out, Buf x, Buf w, Buf b, int64_t M, int64_t H, int64_t xs, float eps, int dt) {
        const std::string op = "layer_norm";
        const int64_t i[20] = {M, H, xs, dt};
        need_all(op, node_extents(op, P_LAYER_NORM, i), {out, x, w, b});
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.layer_norm(ptr<void>(out.first), ptr<const void>(x.first), ptr<const void>(w.first),
                     ptr<const void>(b.first), M, H, xs, eps, dt);
    });
    m.def("silu_mul", [](Buf out, Buf x, int64_t M, int64_t I, int64_t xs, int dt) {
        const std::string op = "silu_mul";
        const int64_t i[20] = {M, I, xs, dt};
        need_all(op, node_extents(op, P_SILU_MUL, i), {out, x});
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.silu_mul(ptr<void>(out.first), ptr<const void>(x.first), M, I, xs, dt);
    });
    m.def("gelu", [](Buf out, Buf x, int64_t M, int64_t C, int64_t xs, bool tanh_variant, int dt) {
        const std::string op = "gelu";
        const int64_t i[20] = {M, C, xs, tanh_variant ? 1 : 0, dt};
        need_all(op, node_extents(op, P_GELU, i), {out, x});
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.gelu(ptr<void>(out.first), ptr<const void>(x.first), M, C, xs, tanh_variant ? 1 : 0, dt);
    });
    m.def("rope", [](Buf out, Buf x, Buf pos, Buf inv_freq, int64_t B, int64_t H, int64_t S, int64_t D, int64_t rd,
                     int64_t sb, int64_t sh, int64_t ss, bool interleaved, int dt) {
        const std::string op = "rope";
        const int64_t i[20] = {B, H, S, D, rd, sb, sh, ss, interleaved ? 1 : 0, dt};
        need_all(op, node_extents(op, P_ROPE, i), {out, x, pos, inv_freq});
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.rope(ptr<void>(out.first), ptr<const void>(x.first), ptr<const int64_t>(pos.first),
               ptr<const double>(inv_freq.first), B, H, S, D, rd, sb, sh, ss, interleaved ? 1 : 0, dt);
    });
    m.def("linear", [](Buf out, Buf x, Buf weights, Buf bias, int64_t M, int64_t N, int64_t K, int64_t xs, int adt,
                       int wfmt) {
        const std::string op = "linear";
        const int64_t i[20] = {M, N, K, xs, adt, wfmt, 0};
        need_all(op, node_extents(op, P_LINEAR, i), {out, x, weights, bias});
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.linear(ptr<void>(out.first), ptr<const void>(x.first), ptr<const void>(weights.first),
                 ptr<const void>(bias.first), M, N, K, xs, adt, wfmt);
    });
    m.def("attention", [](Buf out, Buf q, Buf k, Buf v, Buf q_pos, Buf kv_len, std::vector<int64_t> sizes,
                          std::vector<int64_t> q_stride, std::vector<int64_t> k_stride, std::vector<int64_t> v_stride,
                          bool causal, float scale, int dt) {
        const std::string op = "attention";
        if (sizes.size() != 6 || q_stride.size() != 3 || k_stride.size() != 3 || v_stride.size() != 3)
            fail(op, "expected sizes (B, Hq, Hkv, Sq, Sk, D) and three strides per tensor");
        int64_t i[20] = {0};
        for (int j = 0; j < 6; ++j) i[j] = sizes[j];
        for (int j = 0; j < 3; ++j) {
            i[6 + j] = q_stride[j];
            i[9 + j] = k_stride[j];
            i[12 + j] = v_stride[j];
        }
        i[15] = causal ? 1 : 0;
        i[16] = i[17] = dt;
        need_all(op, node_extents(op, P_ATTENTION, i), {out, q, k, v, q_pos, kv_len});
        AttentionArgs a;
        a.B = sizes[0]; a.Hq = sizes[1]; a.Hkv = sizes[2]; a.Sq = sizes[3]; a.Sk = sizes[4]; a.D = sizes[5];
        a.out = ptr<void>(out.first);
        a.q = ptr<const void>(q.first);
        a.k = ptr<const void>(k.first);
        a.v = ptr<const void>(v.first);
        a.q_pos = ptr<const int32_t>(q_pos.first);
        a.kv_len = ptr<const int32_t>(kv_len.first);
        check_rows(op, a.q_pos, a.kv_len, a.B, a.Sk, -1);  // the kernel reads keys [0, kv_len[b]): never past Sk
        for (int j = 0; j < 3; ++j) {
            a.q_stride[j] = q_stride[j];
            a.k_stride[j] = k_stride[j];
            a.v_stride[j] = v_stride[j];
        }
        a.causal = causal ? 1 : 0;
        a.scale = scale;
        a.dt = a.kvdt = dt;
        const KernelTable& kt = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        kt.attention(&a);
    });

    py::class_<PlanProgram>(m, "Plan", "a step plan compiled for the cpu backend (portinfer/backends/cpu_plan.py); "
                                       "what add() and run() check: csrc/bindings.cpp, 'step plans'")
        .def(py::init([](size_t dynamic, std::vector<Buf> fixed) {
            PlanProgram p;
            p.dynamic = dynamic;
            p.slots.assign(dynamic, 0);
            p.slot_bytes.assign(dynamic, 0);
            p.dynamic_need.assign(dynamic, 0);
            for (size_t j = 0; j < fixed.size(); ++j) {
                if (fixed[j].second < 0 || (fixed[j].first == 0 && fixed[j].second > 0))
                    fail("plan", "fixed slot " + std::to_string(dynamic + j) + ": expected (pointer, bytes >= 0)");
                p.slots.push_back(fixed[j].first);
                p.slot_bytes.push_back(fixed[j].second);
            }
            return p;
        }), py::arg("dynamic"), py::arg("fixed"))
        .def("add", &plan_add, py::arg("op"), py::arg("refs"), py::arg("ints"), py::arg("f"))
        .def("run", [](PlanProgram& p, std::vector<Buf> dynamic, int64_t row0, int64_t T, bool profile) {
            plan_check_run(p, dynamic, row0, T);
            PlanRun run{p.slots, row0, T};
            const KernelTable& k = kernels();
            py::gil_scoped_release release;  // once for the whole step
            std::lock_guard<std::mutex> lock(kernel_lock);
            if (profile) p.seconds.resize(p.nodes.size(), 0.0);
            plan_run(p.nodes, run, k, run_linear_int8, profile ? p.seconds.data() : nullptr);
        }, py::arg("dynamic"), py::arg("row0"), py::arg("T"), py::arg("profile") = false)
        .def("node_seconds", [](PlanProgram& p) { return p.seconds; },
             "seconds per node accumulated by runs with profile=True (empty before the first)")
        .def("clear_seconds", [](PlanProgram& p) { p.seconds.assign(p.seconds.size(), 0.0); });
    m.def("int8_paths", [] {
        std::vector<std::string> names;
        for (const Int8Path& p : int8_paths_compiled())
            if (p.usable) names.push_back(p.name);
        return names;
    }, "int8-route paths usable on this CPU, best first");
    m.def("int8_paths_compiled", [] {
        std::vector<std::string> names;
        for (const Int8Path& p : int8_paths_compiled()) names.push_back(p.name);
        return names;
    });
    m.def("get_int8_path", [] { return std::string(int8_kernels()->name); });
    m.def("set_int8_path", [](const std::string& name) {
        std::lock_guard<std::mutex> lock(kernel_lock);
        select_int8_path(name);
    });
    m.def("set_int8_prefill", [](bool on) { int8_prefill = on; });
    m.def("get_int8_prefill", [] { return int8_prefill; });
    m.def("int8_panel_bytes", [](int fmt, int64_t K) {
        const std::string op = "int8_panel_bytes";
        int8_format_checked(op, fmt);
        if (positive(op, "K", K) % QK) fail(op, "K = " + std::to_string(K) + " is not a whole number of 32-weight blocks");
        return int8_panel_bytes(fmt, K);
    });
    m.def("int8_repack", [](Buf out, Buf blocks, int64_t N, int64_t K, int fmt) {
        const std::string op = "int8_repack";
        int8_format_checked(op, fmt);
        need(op, "out", out, weight_bytes(op, W_INT8 + fmt, N, K));
        need(op, "blocks", blocks, weight_bytes(op, int8_source_format(fmt), N, K));
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);  // panels in parallel on the pool
        int8_repack(ptr<uint8_t>(out.first), ptr<const uint8_t>(blocks.first), N, K, fmt);
    });
    m.def("linear_int8", [](Buf out, Buf x, Buf packed, Buf bias, int64_t M, int64_t N, int64_t K, int64_t xs, int adt,
                            int fmt, int mode) {
        const std::string op = "linear_int8";
        const int64_t i[20] = {M, N, K, xs, adt, fmt, mode};
        need_all(op, node_extents(op, P_LINEAR, i), {out, x, packed, bias});
        kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        run_linear_int8(ptr<void>(out.first), ptr<const void>(x.first), ptr<const void>(packed.first),
                        ptr<const void>(bias.first), M, N, K, xs, adt, fmt, mode);
    }, py::arg("out"), py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"),
       py::arg("xs"), py::arg("adt"), py::arg("fmt"), py::arg("mode") = 1);
}
