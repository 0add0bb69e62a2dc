"""The cpu backend: C++ kernels (csrc/) through the private extension `portinfer._cpu`.

Tensors go to C++ as (data pointer, bytes held) pairs + sizes + strides (no libtorch, no copies):
the base class has already validated every input against the op contract; here we only make sure
what the kernels assume (CPU memory, unit stride in the last dimension, int index tensors
contiguous). The extension checks every call again against the bytes each buffer holds, so even a
wrong call from Python is a ValueError, not an access out of bounds. Kernels run with the GIL
released on the extension's own thread pool.

Instruction sets: the extension carries an AVX-512, an AVX2+FMA+F16C and a portable path, and
`avx512bf16` (the AVX-512 path whose bf16 x bf16 GEMM runs on vdpbf16ps), and picks the best one
this CPU has at first use; `PORTINFER_CPU_SIMD=portable|avx2|avx512|avx512bf16`
or `set_simd` forces one (tests use it to check every path). Threads: PORTINFER_NUM_THREADS,
else the cores this process may run on; `set_num_threads` changes it. Both settings belong
to the process (one pool, one kernel table), not to a backend instance.

Embedding: from a dense table, or straight out of a prepared weight (the panels or blocks below),
so a tied output head is the only copy of its matrix and a quantized table stays blocks.

Weights: dense weights are packed at prepare time into k-major panels of 32 output
features (the layout the GEMM and GEMV read), in the weight's own dtype. Q8_0/Q4_0/Q4_1
weights take one of two routes, a backend setting (`quant_route`, default from
PORTINFER_CPU_QUANT_ROUTE, else "fp32"):
  - "int8": each row of x is quantized once per call to int8 in blocks of 32 (fp32 scale) and
    every output row takes integer dot products against it (AVX512-VNNI / AVX-VNNI vpdpbusd,
    AVX2 maddubs or portable C++, chosen at run time: `int8_paths`, `set_int8_path`,
    PORTINFER_CPU_INT8_PATH); weights are repacked at prepare time into panels of 16 rows
    (csrc/int8.h). The backend then declares `quantizes_activations` and is held to the int8
    budget. The faster route at decode, less accurate (docs/cpu-backend.md). Calls of more than 16
    rows (prefill) still take fp32 activations on the same repacked weights.
  - "int8-all": as "int8", prefill included: on CPUs with the panel kernels (AVX512-VNNI) a prompt
    is read 2.0-2.7x faster, for SmolLM2 prompt logits ~3.5e-2 off transformers instead of ~3e-6.
    For throughput-bound serving, where prompts are half the work (docs/cpu-backend.md).
  - "fp32": weights stay GGUF blocks, dequantized inside the kernel block by block into fp32
    registers; activations stay fp32, so linear meets the fp32 budget (more accurate).
"""
from __future__ import annotations

import os

import torch

from . import quant, spec
from .base import Backend

try:
    from .. import _cpu
    _IMPORT_ERROR = ""
except Exception as exc:  # not built, or built for another Python: the backend says so, imports never fail
    _cpu = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# csrc/common.h WeightFormat: how linear's payload is stored
_WEIGHT_CODE = {"fp32": 0, "fp16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5, "q4_k": 6, "q5_k": 7, "q6_k": 8}
PANEL = 32  # output features per packed panel (csrc/common.h PANEL)
QUANT_ROUTES = ("int8", "fp32", "int8-all")
_INT8_ROUTES = {"int8": 1, "int8-all": 2}  # route -> the int8 mode of its linear calls (csrc/plan.h LinearFn)
# int8 is faster at decode, but changes the embedded SmolLM2-135M's greedy answers (docs/cpu-backend.md):
# opt in with quant_route="int8" / PORTINFER_CPU_QUANT_ROUTE=int8
DEFAULT_QUANT_ROUTE = "fp32"
_INT8_FORMATS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q6_k": 3, "q4_k": 4, "q5_k": 5}  # csrc/common.h QFormat
_W_INT8 = 16  # csrc/common.h: weight format code of the int8 route's panels = 16 + QFormat
_INT8_LAYOUT = "int8x16"  # PreparedLinear.extra["layout"] of weights repacked for the int8 route


def _table_code(w) -> int:
    """The weight format code (csrc/common.h) embedding_prepared reads a prepared weight's rows as."""
    if w.extra.get("layout") == _INT8_LAYOUT:
        return _W_INT8 + _INT8_FORMATS[w.format]
    return _WEIGHT_CODE[w.format]


def _on_cpu(name, t):
    """t in CPU memory (weights may come from another device once, at prepare time)."""
    if t.device.type == "cpu":
        return t
    try:
        return t.cpu()
    except (RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"{name}: expected a tensor whose data can be read on the CPU, got one on {t.device} "
                         f"({type(exc).__name__})") from None


def _unit_rows(t):
    """A 2-D tensor whose rows are contiguous (the contract guarantees it except for a single column)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _index(t, dtype):
    return t.to(device="cpu", dtype=dtype).contiguous()


def _buf(t):
    """(data pointer, bytes its storage holds from there on) of a CPU tensor, (0, 0) for None: every
    native call checks its sizes and strides against these (csrc/bindings.cpp, "checks"), so a wrong
    call cannot make a kernel touch memory the tensor does not own."""
    if t is None:
        return (0, 0)
    return (t.data_ptr(), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())


class CpuBackend(Backend):
    name = "cpu"
    owns_cpu_threads = True
    default_device = "cpu"
    native_weight_formats = tuple(f for f in spec.WEIGHT_FORMATS if f in _WEIGHT_CODE)
    quantizes_activations = False  # per instance: True on the int8 route (see __init__)
    # SmolLM2 prompt logits on the int8 route vs transformers, relative L2 (tests/test_smollm2.py): its prefill
    # runs on fp32 activations (measured ~3e-6); int8-all sets 5e-2 per instance (measured 3.5e-2)
    model_logits_budget = 2e-2
    # embedding gathers rows natively out of dense panels, GGUF blocks and super-blocks, and the int8
    # route's repacked panels (csrc/layout.cpp; spec.prepared_table_meta names those "q4_0@int8x16"), so
    # a tied output head is the table too, and a quantized table is one copy of its blocks on either route
    embedding_table_formats = tuple(_WEIGHT_CODE) + tuple(f"{f}@{_INT8_LAYOUT}" for f in _INT8_FORMATS)

    @classmethod
    def probe(cls):
        if _cpu is None:
            return False, (f"the C++ extension portinfer._cpu is not built ({_IMPORT_ERROR}); "
                           f"reinstall with `pip install -e .` and a C++17 compiler")
        return True, ""

    @classmethod
    def options_from_setting(cls, setting: str) -> dict:
        """cpu[int8] / cpu[fp32] / cpu[int8-all]: the quant route (the backend spec of every --backend flag)."""
        if setting not in QUANT_ROUTES:
            raise ValueError(f"backend cpu[{setting}]: expected cpu[{']/cpu['.join(QUANT_ROUTES)}] (the quant route)")
        return {"quant_route": setting}

    def __init__(self, device=None, threads=None, simd=None, quant_route=None):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"device: the cpu backend runs on 'cpu', got {device!r}")
        ok, reason = self.probe()
        if not ok:
            raise RuntimeError(reason)
        super().__init__("cpu")
        if threads is not None:
            self.set_num_threads(threads)
        if simd is not None:
            self.set_simd(simd)
        if quant_route is None:
            quant_route = os.environ.get("PORTINFER_CPU_QUANT_ROUTE") or DEFAULT_QUANT_ROUTE
        if quant_route not in QUANT_ROUTES:
            raise ValueError(f"quant_route: expected one of {', '.join(QUANT_ROUTES)} (argument or "
                             f"PORTINFER_CPU_QUANT_ROUTE), got {quant_route!r}")
        self.quant_route = quant_route
        # per instance: weights prepared on one route are only ever run on it
        self.quantizes_activations = quant_route in _INT8_ROUTES
        if quant_route == "int8-all":  # prompt logits too (SmolLM2 measured 3.5e-2)
            self.model_logits_budget = 5e-2

    # ---------------------------------------------------------------- settings (process-wide)

    @staticmethod
    def set_num_threads(n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads: expected an integer >= 1, got {n!r}")
        _cpu.set_num_threads(n)

    @staticmethod
    def num_threads() -> int:
        return _cpu.get_num_threads()

    @staticmethod
    def simd_paths() -> list:
        """Instruction-set paths usable on this CPU, best first (the last is always 'portable')."""
        return list(_cpu.simd_paths())

    @staticmethod
    def set_simd(name: str):
        _cpu.set_simd(str(name))

    @staticmethod
    def simd() -> str:
        return _cpu.get_simd()

    @staticmethod
    def amx_status() -> str:
        """'usable' where the amx paths run on AMX tiles; otherwise why not ('absent: ...', 'disabled:
        ...', 'refused: ...' by the kernel, 'failed: ...' the self-check). Asked once a process."""
        return _cpu.amx_status()["status"]

    @staticmethod
    def int8_paths() -> list:
        """int8-route paths usable on this CPU, best first ('avx512vnni', 'avxvnni', 'avx2', 'portable')."""
        return list(_cpu.int8_paths())

    @staticmethod
    def set_int8_path(name: str):
        """Force an int8-route path; one this CPU lacks is refused with a ValueError."""
        _cpu.set_int8_path(str(name))

    @staticmethod
    def int8_path() -> str:
        return _cpu.get_int8_path()

    def info(self):
        out = {"simd": self.simd(), "simd_usable": "/".join(self.simd_paths()), "threads": self.num_threads(),
               "quant_route": self.quant_route, "quant_routes": "/".join(QUANT_ROUTES),
               "amx": self.amx_status()}
        if self.quant_route in _INT8_ROUTES:
            out["int8_path"] = self.int8_path()
            out["int8_formats"] = "/".join(_INT8_FORMATS)  # the block formats on int8 activations
        return out

    # ---------------------------------------------------------------- step plans

    def compile(self, plan):
        """A step plan as one native call per step (see cpu_plan.py); None: the generic executor runs it."""
        from .cpu_plan import compile_plan
        return compile_plan(plan, self, _cpu, _DTYPE_CODE, _WEIGHT_CODE)

    # ---------------------------------------------------------------- ops

    def _prepare_linear(self, weight, dtype):
        n, k = weight.shape
        source = spec.weight_format(weight)
        if isinstance(weight, spec.QuantizedWeight):
            blocks = _on_cpu("weight blocks", weight.blocks).contiguous()
            # the int8 route repacks every block format it computes (the K-quants from their super-blocks,
            # codes and scales as stored: csrc/int8.h) into panels of 16 rows
            code = _INT8_FORMATS.get(weight.format)
            if self.quant_route in _INT8_ROUTES and code is not None:
                panels = (n + 15) // 16
                packed = torch.empty(panels * _cpu.int8_panel_bytes(code, k), dtype=torch.uint8)
                _cpu.int8_repack(_buf(packed), _buf(blocks), n, k, code)
                return spec.PreparedLinear(self.name, n, k, dtype, weight.format, weight.format, packed,
                                           extra={"layout": _INT8_LAYOUT, "int8_mode": _INT8_ROUTES[self.quant_route]})
            if weight.format in _WEIGHT_CODE:
                return spec.PreparedLinear(self.name, n, k, dtype, weight.format, weight.format, blocks)
            # a block format without a kernel here: fp32, once (exact: the blocks' values are fp32 numbers)
            weight = quant.dequantize(spec.QuantizedWeight(weight.format, blocks, weight.shape), torch.float32)
        w = _unit_rows(_on_cpu("weight", weight))
        packed = torch.zeros((n + PANEL - 1) // PANEL, k, PANEL, dtype=w.dtype)
        _cpu.pack_dense(_buf(packed), _buf(w), n, k, w.stride(0), w.element_size())
        fmt = spec.dtype_name(w.dtype)
        return spec.PreparedLinear(self.name, n, k, dtype, fmt, source, packed)

    def _embedding(self, ids, table):
        ids = _index(ids, torch.int64)
        if isinstance(table, spec.PreparedLinear):  # rows of a prepared weight: panels or blocks
            out = self.new_output((ids.shape[0], table.in_features), table.dtype)
            _cpu.embedding_prepared(_buf(out), _buf(ids), _buf(table.payload), ids.shape[0], table.in_features,
                                    table.out_features, _table_code(table), _DTYPE_CODE[table.dtype])
            return out
        n, h = ids.shape[0], table.shape[1]
        out = self.new_output((n, h), table.dtype)
        _cpu.embedding(_buf(out), _buf(ids), _buf(table), n, h, table.shape[0], table.stride(0), table.element_size())
        return out

    def _linear(self, x, w, bias):
        m, k = x.shape
        out = self.new_output((m, w.out_features), x.dtype)
        if w.extra.get("layout") == _INT8_LAYOUT:
            _cpu.linear_int8(_buf(out), _buf(x), _buf(w.payload), _buf(bias), m, w.out_features, k, x.stride(0),
                             _DTYPE_CODE[x.dtype], _INT8_FORMATS[w.format], w.extra.get("int8_mode", 1))
            return out
        _cpu.linear(_buf(out), _buf(x), _buf(w.payload), _buf(bias), m, w.out_features, k, x.stride(0),
                    _DTYPE_CODE[x.dtype], _WEIGHT_CODE[w.format])
        return out

    def _rms_norm(self, x, weight, eps):
        m, h = x.shape
        out = self.new_output((m, h), x.dtype)
        _cpu.rms_norm(_buf(out), _buf(x), _buf(weight), m, h, x.stride(0), eps, _DTYPE_CODE[x.dtype])
        return out

    def _layer_norm(self, x, weight, bias, eps):
        m, h = x.shape
        out = self.new_output((m, h), x.dtype)
        _cpu.layer_norm(_buf(out), _buf(x), _buf(weight), _buf(bias), m, h, x.stride(0), eps, _DTYPE_CODE[x.dtype])
        return out

    def _rope(self, x, pos, rotary):
        b, h, s, d = x.shape
        pos = _index(pos, torch.int64)
        inv_freq = _index(rotary.inv_freq, torch.float64)
        out = self.new_output(x.shape, x.dtype)
        sb, sh, ss, _ = x.stride()
        _cpu.rope(_buf(out), _buf(x), _buf(pos), _buf(inv_freq), b, h, s, d, rotary.rotary_dim, sb, sh, ss,
                  rotary.style == "interleaved", _DTYPE_CODE[x.dtype])
        return out

    def _silu_mul(self, x):
        m, two_i = x.shape
        out = self.new_output((m, two_i // 2), x.dtype)
        _cpu.silu_mul(_buf(out), _buf(x), m, two_i // 2, x.stride(0), _DTYPE_CODE[x.dtype])
        return out

    def _gelu(self, x, approximate):
        cols = x.shape[-1]
        rows = x.reshape(-1, cols)  # a view whenever the leading dims can be merged
        out = self.new_output(x.shape, x.dtype)
        _cpu.gelu(_buf(out), _buf(rows), rows.shape[0], cols, rows.stride(0), approximate == "tanh",
                  _DTYPE_CODE[x.dtype])
        return out

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        q_pos, kv_len = _index(q_pos, torch.int32), _index(kv_len, torch.int32)
        out = self.new_output(q.shape, q.dtype)
        _cpu.attention(_buf(out), _buf(q), _buf(k), _buf(v), _buf(q_pos), _buf(kv_len), [b, hq, hkv, sq, sk, d],
                       list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]), causal, scale,
                       _DTYPE_CODE[q.dtype])
        return out
