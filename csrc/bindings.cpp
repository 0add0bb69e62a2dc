// The only file that includes pybind11: the private module portinfer._cpu.
//
// Tensors arrive as (data pointer, sizes, strides) integers from portinfer/backends/cpu.py, which
// validated them against the op contract; nothing is copied on the way in. Every kernel runs with
// the GIL released, under one lock (the pool and its scratch buffers serve one kernel at a time).
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

namespace py = pybind11;

void pack_dense(void* packed, const void* w, int64_t N, int64_t K, int64_t ws, int64_t elem_bytes);
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
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        paths.push_back({"avx512", table_avx512()});
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
    throw py::value_error("simd: expected one of the paths usable on this CPU (" + names + "), got '" + name + "'");
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
};

std::vector<Int8Path> int8_paths_compiled() {
    std::vector<Int8Path> paths;
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    paths.push_back({"avx512vnni", int8_kernels_avx512vnni(),
                     avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"),
                     "AVX512F, AVX512BW, AVX512VL and AVX512-VNNI"});
    paths.push_back({"avxvnni", int8_kernels_avxvnni(), avx2 && __builtin_cpu_supports("avxvnni"),
                     "AVX2, FMA, F16C and AVX-VNNI"});
    paths.push_back({"avx2", int8_kernels_avx2(), avx2, "AVX2, FMA and F16C"});
#endif
    paths.push_back({"portable", int8_kernels_portable(), true, "nothing"});
    return paths;
}

const Int8Kernels* int8_active = nullptr;
bool int8_prefill = false;  // M > 4 on int8 activations too (set_int8_prefill; benchmarks and tests)

std::string int8_usable_names() {
    std::string names;
    for (const Int8Path& p : int8_paths_compiled())
        if (p.usable) names += std::string(names.empty() ? "" : ", ") + p.name;
    return names;
}

void select_int8_path(const std::string& name) {
    for (const Int8Path& p : int8_paths_compiled())
        if (name == p.name) {
            if (!p.usable)
                throw py::value_error("int8 path '" + name + "': needs a CPU with " + p.needs +
                                      ", which this one lacks; usable here: " + int8_usable_names());
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
                     int64_t xs, int adt, int fmt) {
    const Int8Kernels* k = int8_kernels();
    const KernelTable& t = kernels();
    // prefill (M > 4): the GEMM is compute-bound, where int8 activations bought no speed here
    // but cost accuracy: fp32 activations on the same repacked weights
    if (M > I8_ROWS && !int8_prefill) {
        t.linear(out, x, packed, bias, M, N, K, xs, adt, W_INT8X4 + fmt);
        return;
    }
    linear_int8(k, out, x, (const uint8_t*)packed, bias, M, N, K, xs, adt, fmt);
}

// a compiled step plan (plan.h): its nodes and its pointer table (the first `dynamic` slots are
// rebound by every run: step inputs and KV-cache layers)
struct PlanProgram {
    std::vector<PlanNode> nodes;
    std::vector<uintptr_t> slots;
    size_t dynamic = 0;
    std::vector<double> seconds;  // per node, accumulated by runs with profile=True
};

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "portinfer cpu backend kernels (see csrc/)";

    m.def("simd_paths", [] {
        std::vector<std::string> names;
        for (const Path& p : usable_paths()) names.push_back(p.name);
        return names;
    }, "instruction-set paths usable on this CPU, best first");
    m.def("get_simd", [] { kernels(); return std::string(active.name); });
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

    m.def("pack_dense", [](uintptr_t packed, uintptr_t w, int64_t N, int64_t K, int64_t ws, int64_t elem_bytes) {
        py::gil_scoped_release release;
        pack_dense(ptr<void>(packed), ptr<const void>(w), N, K, ws, elem_bytes);
    });
    m.def("embedding", [](uintptr_t out, uintptr_t ids, uintptr_t table, int64_t N, int64_t H, int64_t ts, int64_t eb) {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);  // it may run on the pool
        embedding(ptr<void>(out), ptr<const int64_t>(ids), ptr<const void>(table), N, H, ts, eb);
    });
    m.def("embedding_prepared", [](uintptr_t out, uintptr_t ids, uintptr_t w, int64_t N, int64_t H, int wfmt, int dt) {
        if (!(wfmt >= W_F32 && wfmt <= W_Q6_K)) throw std::invalid_argument("embedding_prepared: weight format code");
        if (wfmt >= W_Q4_K && H % 256 != 0)
            throw std::invalid_argument("embedding_prepared: K-quant rows need H a multiple of 256");
        if (wfmt >= W_Q8_0 && H % QK) throw std::invalid_argument("embedding_prepared: H must be whole blocks of 32");
        py::gil_scoped_release release;
        embedding_prepared(ptr<void>(out), ptr<const int64_t>(ids), ptr<const void>(w), N, H, wfmt, dt);
    });
    m.def("rms_norm", [](uintptr_t out, uintptr_t x, uintptr_t w, int64_t M, int64_t H, int64_t xs, float eps, int dt) {
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.rms_norm(ptr<void>(out), ptr<const void>(x), ptr<const void>(w), M, H, xs, eps, dt);
    });
    m.def("layer_norm", [](uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t b, int64_t M, int64_t H, int64_t xs,
                           float eps, int dt) {
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.layer_norm(ptr<void>(out), ptr<const void>(x), ptr<const void>(w), ptr<const void>(b), M, H, xs, eps, dt);
    });
    m.def("silu_mul", [](uintptr_t out, uintptr_t x, int64_t M, int64_t I, int64_t xs, int dt) {
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.silu_mul(ptr<void>(out), ptr<const void>(x), M, I, xs, dt);
    });
    m.def("gelu", [](uintptr_t out, uintptr_t x, int64_t M, int64_t C, int64_t xs, bool tanh_variant, int dt) {
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.gelu(ptr<void>(out), ptr<const void>(x), M, C, xs, tanh_variant ? 1 : 0, dt);
    });
    m.def("rope", [](uintptr_t out, uintptr_t x, uintptr_t pos, uintptr_t inv_freq, int64_t B, int64_t H, int64_t S,
                     int64_t D, int64_t rd, int64_t sb, int64_t sh, int64_t ss, bool interleaved, int dt) {
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.rope(ptr<void>(out), ptr<const void>(x), ptr<const int64_t>(pos), ptr<const double>(inv_freq), B, H, S, D, rd,
               sb, sh, ss, interleaved ? 1 : 0, dt);
    });
    m.def("linear", [](uintptr_t out, uintptr_t x, uintptr_t weights, uintptr_t bias, int64_t M, int64_t N, int64_t K,
                       int64_t xs, int adt, int wfmt) {
        const KernelTable& k = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        k.linear(ptr<void>(out), ptr<const void>(x), ptr<const void>(weights), ptr<const void>(bias), M, N, K, xs, adt,
                 wfmt);
    });
    m.def("attention", [](uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t q_pos, uintptr_t kv_len,
                          std::vector<int64_t> sizes, std::vector<int64_t> q_stride, std::vector<int64_t> k_stride,
                          std::vector<int64_t> v_stride, bool causal, float scale, int dt) {
        if (sizes.size() != 6 || q_stride.size() != 3 || k_stride.size() != 3 || v_stride.size() != 3)
            throw py::value_error("attention: expected sizes (B, Hq, Hkv, Sq, Sk, D) and three strides per tensor");
        AttentionArgs a;
        a.out = ptr<void>(out);
        a.q = ptr<const void>(q);
        a.k = ptr<const void>(k);
        a.v = ptr<const void>(v);
        a.q_pos = ptr<const int32_t>(q_pos);
        a.kv_len = ptr<const int32_t>(kv_len);
        a.B = sizes[0]; a.Hq = sizes[1]; a.Hkv = sizes[2]; a.Sq = sizes[3]; a.Sk = sizes[4]; a.D = sizes[5];
        for (int i = 0; i < 3; ++i) {
            a.q_stride[i] = q_stride[i];
            a.k_stride[i] = k_stride[i];
            a.v_stride[i] = v_stride[i];
        }
        a.causal = causal ? 1 : 0;
        a.scale = scale;
        a.dt = dt;
        const KernelTable& kt = kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        kt.attention(&a);
    });

    py::class_<PlanProgram>(m, "Plan", "a step plan compiled for the cpu backend (portinfer/backends/cpu_plan.py)")
        .def(py::init([](size_t dynamic, std::vector<uintptr_t> fixed) {
            PlanProgram p;
            p.dynamic = dynamic;
            p.slots.assign(dynamic, 0);
            p.slots.insert(p.slots.end(), fixed.begin(), fixed.end());
            return p;
        }))
        .def("add", [](PlanProgram& p, int op, std::vector<std::vector<int64_t>> refs, std::vector<int64_t> ints,
                       float f) {
            if (op < P_EMBEDDING || op > P_ROWS_COPY) throw py::value_error("plan node: unknown op " + std::to_string(op));
            if (refs.size() > 6 || ints.size() > 20) throw py::value_error("plan node: at most 6 refs and 20 ints");
            PlanNode n;
            n.op = op;
            for (size_t r = 0; r < refs.size(); ++r) {
                if (refs[r].size() != 3) throw py::value_error("plan node: a ref is (slot, offset, cache row bytes)");
                if (refs[r][0] < -1 || refs[r][0] >= (int64_t)p.slots.size())
                    throw py::value_error("plan node: slot " + std::to_string(refs[r][0]) + " out of range");
                n.r[r] = PlanRef{refs[r][0], refs[r][1], refs[r][2]};
            }
            for (size_t j = 0; j < ints.size(); ++j) n.i[j] = ints[j];
            n.f = f;
            p.nodes.push_back(n);
        })
        .def("run", [](PlanProgram& p, std::vector<uintptr_t> dynamic, int64_t row0, int64_t T, bool profile) {
            if (dynamic.size() != p.dynamic)
                throw py::value_error("plan run: expected " + std::to_string(p.dynamic) + " step pointers, got " +
                                      std::to_string(dynamic.size()));
            for (size_t j = 0; j < dynamic.size(); ++j) p.slots[j] = dynamic[j];
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
    m.def("int8_group_bytes", [](int fmt, int64_t K) { return int8_group_bytes(fmt, K); });
    m.def("int8_repack", [](uintptr_t out, uintptr_t blocks, int64_t N, int64_t K, int fmt) {
        py::gil_scoped_release release;
        int8_repack(ptr<uint8_t>(out), ptr<const uint8_t>(blocks), N, K, fmt);
    });
    m.def("linear_int8", [](uintptr_t out, uintptr_t x, uintptr_t packed, uintptr_t bias, int64_t M, int64_t N,
                            int64_t K, int64_t xs, int adt, int fmt) {
        kernels();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(kernel_lock);
        run_linear_int8(ptr<void>(out), ptr<const void>(x), ptr<const void>(packed), ptr<const void>(bias), M, N, K, xs,
                        adt, fmt);
    });
}
