// AMX (Advanced Matrix Extensions: Sapphire Rapids and later Xeons): the tile unit behind the "amx"
// kernel path (bf16 x bf16 GEMM on TDPBF16PS for prefill) and the "amx" int8-route path (TDPBSUD
// against the int8 route's repacked panels). Kernels in amx_kernels.cpp, permission and status in
// amx.cpp; docs/cpu-backend.md, "AMX".
//
// Three things must hold before a tile instruction runs, else it dies with SIGILL:
//   1. the CPU reports amx-tile (and amx-bf16 / amx-int8 for the instructions used);
//   2. the process asked the kernel for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM,
//      XFEATURE_XTILEDATA; Linux 5.16+) and was granted it -- asked once, on first use of the paths;
//   3. the thread loaded a tile configuration (ldtilecfg) that fits every tile it touches.
// The paths then prove themselves once per process: a forked child runs the tile kernels on a small
// problem and compares them with the software tile unit below (the integer sums bit for bit); a
// child that dies (SIGILL, SIGSEGV) or disagrees leaves the paths unusable, with the reason in
// amx_status(). PORTINFER_CPU_AMX=0 never asks.
//
// The software tile unit (EmuTiles) executes the same kernels with the instructions' documented
// semantics in plain C++: set_amx_emulation(true) makes both paths usable on any AVX512-BF16 /
// AVX512-VNNI CPU, so that their packing, edge tiles and driver are tested where there is no AMX.
#pragma once

#include <string>

#include "common.h"
#include "int8.h"

// the AMX state of this process: asks for the permission and runs the self-check on first call
struct AmxState {
    bool bf16;           // the amx kernel path's tiles are usable (hardware, granted, self-checked)
    bool int8;           // the amx int8-route path's tiles are usable
    std::string status;  // "usable", or why not: "absent: ...", "disabled: ...", "refused: ...", "failed: ..."
};
const AmxState& amx_state();
// the vector extensions the amx paths' other kernels, and the software tile unit, also run on (AVX-512 F/BW/
// DQ/VL, AVX512-BF16, AVX512-VNNI, AVX2, FMA, F16C): every AMX CPU has them
bool amx_vector_isa();
// the permission request itself (ARCH_REQ_XCOMP_PERM), made whether or not the CPU reports AMX; ""
// when granted, else the kernel's refusal (tests: the refusal path on a CPU without AMX)
std::string amx_request_permission();

// the software tile unit instead of the hardware (tests)
void amx_set_emulation(bool on);
bool amx_emulation();

// the kernel table of the amx path: avx512bf16's, its bf16 x bf16 linear at M > 16 on tiles
const KernelTable* table_amx();
// the int8 route on tiles: panel calls of 16 rows of x on TDPBSUD, fewer rows on AVX512-VNNI
const Int8Kernels* int8_kernels_amx();

// amx_kernels.cpp: the self-check's work (no thread pool: it runs in a forked child). 0 when the
// hardware tiles agree with the software ones, else which check failed (1 int8, 2 bf16).
int amx_selfcheck_run(bool hardware);
// the parent's half, before the fork: builds the inputs and the software tile unit's answers
void amx_selfcheck_prepare();
// the whole self-check: prepared here, the tiles run in a forked child; "" when they agreed, else why
// not (the child's signal, its exit status, or a timeout). amx_state() runs it once, where the CPU
// has AMX and the kernel granted it; tests run it anywhere (without AMX the child dies with SIGILL).
std::string amx_selfcheck_forked();
