// A step plan compiled for the cpu backend: the whole step of a model as one native call.
//
// portinfer/backends/cpu_plan.py turns a traced Plan (portinfer/runtime/graph.py) into a list of
// PlanNode: each names its kernel, where its tensors are (a slot of the pointer table + a byte
// offset) and its sizes and strides. Slots 0..3 are the step inputs (ids, pos, q_pos, kv_len),
// then the KV cache (keys then values, one slot per layer), both rebound on every run; the rest
// are the plan's own buffers and the weights, fixed when it is compiled. Nodes run in order on
// the calling thread, their kernels on the pool, whose workers stay hot between nodes.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

enum PlanOp : int {
    P_EMBEDDING = 0,
    P_RMS_NORM = 1,
    P_LINEAR = 2,
    P_ROPE = 3,
    P_SILU_MUL = 4,
    P_ATTENTION = 5,
    P_ADD = 6,          // out = a + b, n elements, contiguous
    P_KV_WRITE = 7,     // each row's n_new = kv_len - q_pos keys/values into its cache row at q_pos
    P_MERGE_HEADS = 8,  // [B, H, S, D] (contiguous) -> [B*S, H*D]
    P_LAST_ROWS = 9,    // [B*S, C] -> [B, C]: row b*S + max(n_new - 1, 0)
    P_GELU = 10,
    P_LAYER_NORM = 11,
    P_ROWS_COPY = 12,   // out [M, C] contiguous = x [M, C] with row stride xs (heads as rows: head_rows)
};

struct PlanRef {
    int64_t slot = -1;   // -1: none (e.g. no bias)
    int64_t offset = 0;  // bytes from the slot's pointer
    int64_t cache = 0;   // 1: a KV-cache slot: the run's first row and row stride (Hkv * T * D) apply
};

struct PlanNode {
    int op = 0;
    PlanRef r[6];
    int64_t i[20] = {0};
    float f = 0.f;
};

// the run's per-call geometry: cache rows [row0, row0 + B) of a cache with T positions
struct PlanRun {
    std::vector<uintptr_t> slots;
    int64_t row0 = 0;
    int64_t T = 0;
};

// linear on int8-route weights (bindings.cpp run_linear_int8): a P_LINEAR node with i[6] = 1 (decode rows
// on int8 activations, prefill on fp32) or 2 (every row on int8)
typedef void (*LinearFn)(void* out, const void* x, const void* w, const void* bias, int64_t M, int64_t N, int64_t K,
                         int64_t xs, int adt, int fmt, int mode);

// seconds: nullptr, or one accumulator per node (each node's wall time is added: the profile that
// `CpuPlanExecutor.profile` reads; two clock reads per node)
void plan_run(const std::vector<PlanNode>& nodes, const PlanRun& run, const KernelTable& k, LinearFn linear_int8,
              double* seconds = nullptr);
