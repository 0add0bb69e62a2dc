"""The backend API cannot crash the process (issue 16): the review's cases -- a prepared weight whose
out_features was changed, buffers smaller than the sizes claimed, ids and kv_len out of range, unknown
dtype / format codes -- and the same for the int8 route, K-quant weights, prepared embedding tables and
step plans (a node's ref past its slot, a cache too small for the run's rows) each end in a ValueError
from the extension that names the argument (csrc/bindings.cpp, "checks" and "step plans").

The cases run in one child process, so a segfault is a failed test naming its case, not a dead test
run. A few valid calls run there too, so the checks are shown not to refuse what is right."""
import subprocess
import sys
import textwrap

import pytest

from portinfer.backends import cpu as cpu_module

pytestmark = pytest.mark.skipif(cpu_module._cpu is None, reason="the cpu extension is not built")

PRELUDE = """
import torch
from portinfer.backends import get, spec
from portinfer.backends.cpu import _buf
from portinfer.backends.quant import quantize
from portinfer import _cpu
from portinfer.backends.cpu_plan import (P_EMBEDDING, P_RMS_NORM, P_LINEAR, P_ATTENTION, P_KV_WRITE, P_ADD,
                                         P_ROWS_COPY)
KEEP = []  # every tensor a case hands over stays alive until the process ends (no freed buffer is read)


def keep(t):
    KEEP.append(t)
    return _buf(t)


cpu = get("cpu")
int8 = get("cpu", quant_route="int8")
W = torch.randn(64, 32)
w = cpu.prepare_linear(W)
x = torch.randn(4, 32)
q8 = int8.prepare_linear(quantize(torch.randn(64, 64), "q8_0"))

# a step plan by hand: slots 0..3 the step inputs (ids, pos, q_pos, kv_len), 4 / 5 the K / V cache of
# one layer (rows 2, Hkv 1, T 8, D 16), then the fixed buffers below
D, T = 16, 8
q = torch.randn(1, 2, 1, D); att_out = torch.empty_like(q); k_new = torch.randn(1, 1, 1, D)
table, emb_out = torch.randn(10, 8), torch.empty(2, 8)
FIXED = [q, att_out, k_new, table, emb_out]  # slots 6..10
kc, vc = torch.randn(2, 1, T, D), torch.randn(2, 1, T, D)
CACHE = (4, 0, 1 * D * 4)

def plan(nodes=()):
    p = _cpu.Plan(6, [_buf(t) for t in FIXED])
    for node in nodes:
        p.add(*node)
    return p

ATT = (P_ATTENTION, [[7, 0, 0], [6, 0, 0], list(CACHE), [5, 0, D * 4], [2, 0, 0], [3, 0, 0]],
       [1, 2, 1, 1, 0, D, 2 * D, D, D, 0, 0, D, 0, 0, D, 1, 0], 0.25)
KVW = (P_KV_WRITE, [list(CACHE), [5, 0, D * 4], [8, 0, 0], [8, 0, 0], [2, 0, 0], [3, 0, 0]],
       [1, 1, 1, D, D, D, D, D, D, D, 0, 0], 0.0)
EMB = (P_EMBEDDING, [[10, 0, 0], [0, 0, 0], [9, 0, 0]], [2, 8, 8, 4, -1, 0, 10], 0.0)

def step(p, ids=(3, 9), q_pos=4, kv_len=5, row0=1, T=T, caches=None):
    ids = torch.tensor(ids); qp = torch.tensor([q_pos], dtype=torch.int32)
    kl = torch.tensor([kv_len], dtype=torch.int32)
    caches = caches or [_buf(kc), _buf(vc)]
    p.run([_buf(ids), (0, 0), _buf(qp), _buf(kl)] + caches, row0, T)

# valid calls first: the checks must not refuse them
assert torch.allclose(cpu.linear(x, w), x @ W.T, atol=1e-4)
assert int8.linear(torch.randn(2, 64), q8).shape == (2, 64)
assert torch.equal(cpu.embedding(torch.tensor([5, 0]), w), W[[5, 0]])
p = plan([KVW, ATT, EMB])
step(p)
assert torch.equal(kc[1, 0, 4], k_new[0, 0, 0]) and torch.equal(emb_out, table[[3, 9]])
i32 = lambda v: torch.tensor([v], dtype=torch.int32)
ref = get("reference").attention(q, kc[1:], vc[1:], i32(4), i32(5), True, 0.25)
assert torch.allclose(att_out, ref.float(), atol=1e-5), "a checked plan gives the op's answer"
print("VALID CALLS OK", flush=True)
"""

# name -> (code, the exception type, text its message must contain: the argument it names); keep(t) is
# _buf(t) with t kept alive, so a case never hands over the pointer of a freed temporary
CASES = {
    # the review's case: out_features changed on a prepared weight, then linear
    "frozen handle": ("w.out_features = 4096", "FrozenInstanceError", "cannot assign"),
    "handle mutated behind the dataclass": ("object.__setattr__(w, 'out_features', 4096); cpu.linear(x, w)",
                                            "ValueError", "linear: weights: the call needs"),
    "payload swapped for a small tensor": ("object.__setattr__(w, 'payload', torch.zeros(8)); cpu.linear(x, w)",
                                           "ValueError", "linear: weights"),
    "payload storage emptied": ("w.payload.set_(); cpu.linear(x, w)", "ValueError", "linear: weights"),
    "in_features mutated": ("object.__setattr__(w, 'in_features', 4096); cpu.linear(torch.randn(4, 4096), w)",
                            "ValueError", "linear: weights"),
    "quantized blocks mutated": ("""
        qw = cpu.prepare_linear(quantize(torch.randn(64, 64), "q4_0"))
        object.__setattr__(qw, 'out_features', 1 << 20); cpu.linear(torch.randn(2, 64), qw)""",
                                 "ValueError", "linear: weights"),
    "K-quant: K not whole super-blocks": ("_cpu.linear(keep(torch.empty(4, 64)), keep(x), keep(w.payload), (0, 0), "
                                          "4, 64, 32, 32, 0, 6)", "ValueError", "256-weight super-blocks"),
    "K-quant: blocks smaller than claimed": ("_cpu.linear(keep(torch.empty(4, 64)), keep(torch.randn(4, 256)), "
                                             "keep(torch.zeros(144, dtype=torch.uint8)), (0, 0), 4, 64, 256, 256, 0, 8)",
                                             "ValueError", "linear: weights: the call needs"),
    "linear: output buffer too small": ("_cpu.linear(keep(torch.empty(1)), keep(x), keep(w.payload), (0, 0), 4, 64, "
                                        "32, 32, 0, 0)", "ValueError", "linear: out:"),
    "linear: bias too small": ("_cpu.linear(keep(torch.empty(4, 64)), keep(x), keep(w.payload), "
                               "keep(torch.zeros(3)), 4, 64, 32, 32, 0, 0)", "ValueError", "linear: bias:"),
    "linear: unknown weight format": ("_cpu.linear(keep(torch.empty(4, 64)), keep(x), keep(w.payload), (0, 0), 4, "
                                      "64, 32, 32, 0, 99)", "ValueError", "weight format code"),
    "linear: unknown dtype code": ("_cpu.linear(keep(torch.empty(4, 64)), keep(x), keep(w.payload), (0, 0), 4, 64, "
                                   "32, 32, 7, 0)", "ValueError", "activation dtype"),
    "linear: size product overflow": ("_cpu.linear(keep(torch.empty(4, 64)), keep(x), keep(w.payload), (0, 0), "
                                      "1 << 62, 64, 1 << 40, 32, 0, 0)", "ValueError", "overflows 64 bits"),
    "linear: null pointer": ("_cpu.linear((0, 1 << 40), keep(x), keep(w.payload), (0, 0), 4, 64, 32, 32, 0, 0)",
                             "ValueError", "linear: out: null buffer"),
    "linear: negative row stride": ("_cpu.linear(keep(torch.empty(4, 64)), keep(x), keep(w.payload), (0, 0), 4, "
                                    "64, 32, -32, 0, 0)", "ValueError", "x: expected strides >= 0"),
    "int8 route: handle mutated": ("object.__setattr__(q8, 'out_features', 4096); int8.linear(torch.randn(2, 64), q8)",
                                   "ValueError", "linear_int8: weights"),
    "int8 route: unknown format": ("_cpu.linear_int8(keep(torch.empty(2, 64)), keep(torch.randn(2, 64)), "
                                   "keep(q8.payload), (0, 0), 2, 64, 64, 64, 0, 9)", "ValueError", "int8 format code"),
    "int8_repack: output too small": ("_cpu.int8_repack(keep(torch.empty(8, dtype=torch.uint8)), "
                                      "keep(quantize(torch.randn(64, 64), 'q8_0').blocks), 64, 64, 0)",
                                      "ValueError", "int8_repack: out:"),
    "int8_repack: blocks too small": ("_cpu.int8_repack(keep(torch.empty(1 << 16, dtype=torch.uint8)), "
                                      "keep(torch.empty(8, dtype=torch.uint8)), 64, 64, 0)",
                                      "ValueError", "int8_repack: blocks:"),
    "int8_panel_bytes: unknown format": ("_cpu.int8_panel_bytes(7, 64)", "ValueError", "format code"),
    "embedding: id past the table": ("t = torch.randn(10, 8); ids = torch.tensor([3, 10]); "
                                     "_cpu.embedding(keep(torch.empty(2, 8)), keep(ids), keep(t), 2, 8, 10, 8, 4)",
                                     "ValueError", "embedding: ids: expected every id in [0, 10)"),
    "embedding: negative id": ("t = torch.randn(10, 8); ids = torch.tensor([-1, 2]); "
                               "_cpu.embedding(keep(torch.empty(2, 8)), keep(ids), keep(t), 2, 8, 10, 8, 4)",
                               "ValueError", "ids: expected every id"),
    "embedding: table smaller than claimed": ("t = torch.randn(10, 8); ids = torch.tensor([3, 9]); "
                                              "_cpu.embedding(keep(torch.empty(2, 8)), keep(ids), keep(t), 2, 8, 1000, "
                                              "8, 4)", "ValueError", "embedding: table:"),
    "embedding_prepared: id past the rows": ("_cpu.embedding_prepared(keep(torch.empty(1, 32)), "
                                             "keep(torch.tensor([64])), keep(w.payload), 1, 32, 64, 0, 0)",
                                             "ValueError", "embedding_prepared: ids"),
    "embedding_prepared: table handle mutated": ("object.__setattr__(w, 'out_features', 1 << 20); "
                                                 "cpu.embedding(torch.tensor([70000]), w)", "ValueError",
                                                 "embedding_prepared: weights"),
    "embedding_prepared: unknown format": ("_cpu.embedding_prepared(keep(torch.empty(1, 256)), "
                                           "keep(torch.tensor([0])), keep(torch.zeros(1 << 12, dtype=torch.uint8)), "
                                           "1, 256, 4, 22, 0)", "ValueError", "weight format code"),
    "embedding_prepared: int8 groups smaller than claimed": ("_cpu.embedding_prepared(keep(torch.empty(1, 64)), "
                                                             "keep(torch.tensor([0])), keep(q8.payload), 1, 64, 4096, "
                                                             "16, 0)", "ValueError", "embedding_prepared: weights"),
    "embedding_prepared: K-quant rows past the blocks": ("_cpu.embedding_prepared(keep(torch.empty(1, 256)), "
                                                         "keep(torch.tensor([3])), keep(torch.zeros(144, "
                                                         "dtype=torch.uint8)), 1, 256, 4, 6, 0)", "ValueError",
                                                         "embedding_prepared: weights: the call needs 576 bytes"),
    "embedding_prepared: K-quant H not whole super-blocks": ("_cpu.embedding_prepared(keep(torch.empty(1, 64)), "
                                                             "keep(torch.tensor([0])), keep(torch.zeros(1 << 12, "
                                                             "dtype=torch.uint8)), 1, 64, 4, 7, 0)", "ValueError",
                                                             "256-weight super-blocks"),
    "rms_norm: row stride past the buffer": ("t = torch.randn(4, 8); _cpu.rms_norm(keep(torch.empty(4, 8)), keep(t), "
                                             "keep(torch.ones(8)), 4, 8, 1000, 1e-6, 0)", "ValueError", "rms_norm: x:"),
    "layer_norm: bias too small": ("t = torch.randn(4, 8); _cpu.layer_norm(keep(torch.empty(4, 8)), keep(t), "
                                   "keep(torch.ones(8)), keep(torch.ones(2)), 4, 8, 8, 1e-6, 0)", "ValueError",
                                   "layer_norm: bias:"),
    "attention: kv_len past Sk": ("""
        q1 = torch.randn(1, 2, 1, 16); k1 = torch.randn(1, 2, 5, 16)
        pos, lens = torch.tensor([0], dtype=torch.int32), torch.tensor([500], dtype=torch.int32)
        _cpu.attention(keep(torch.empty_like(q1)), keep(q1), keep(k1), keep(k1), keep(pos), keep(lens),
                       [1, 2, 2, 1, 5, 16], list(q1.stride()[:3]), list(k1.stride()[:3]), list(k1.stride()[:3]),
                       True, 0.25, 0)""", "ValueError", "attention: kv_len: expected values in [0, 5]"),
    "attention: Sk larger than the keys": ("""
        q1 = torch.randn(1, 2, 1, 16); k1 = torch.randn(1, 2, 5, 16)
        pos, lens = torch.tensor([0], dtype=torch.int32), torch.tensor([400], dtype=torch.int32)
        _cpu.attention(keep(torch.empty_like(q1)), keep(q1), keep(k1), keep(k1), keep(pos), keep(lens),
                       [1, 2, 2, 1, 500, 16], list(q1.stride()[:3]), list(k1.stride()[:3]), list(k1.stride()[:3]),
                       True, 0.25, 0)""", "ValueError", "attention: k:"),
    "attention: Hq not a multiple of Hkv": ("""
        q1 = torch.randn(1, 3, 1, 16); k1 = torch.randn(1, 2, 5, 16)
        pos, lens = torch.tensor([0], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
        _cpu.attention(keep(torch.empty_like(q1)), keep(q1), keep(k1), keep(k1), keep(pos), keep(lens),
                       [1, 3, 2, 1, 5, 16], list(q1.stride()[:3]), list(k1.stride()[:3]), list(k1.stride()[:3]),
                       True, 0.25, 0)""", "ValueError", "multiple of Hkv"),
    "rope: rotary_dim past D": ("x4 = torch.randn(1, 1, 2, 8); _cpu.rope(keep(torch.empty_like(x4)), keep(x4), "
                                "keep(torch.zeros(1, 2, dtype=torch.int64)), keep(torch.ones(4, dtype=torch.float64)), "
                                "1, 1, 2, 8, 64, 16, 16, 8, False, 0)", "ValueError", "rope: rotary_dim"),
    "rope: inv_freq too short": ("x4 = torch.randn(1, 1, 2, 8); _cpu.rope(keep(torch.empty_like(x4)), keep(x4), "
                                 "keep(torch.zeros(1, 2, dtype=torch.int64)), keep(torch.ones(1, dtype=torch.float64)), "
                                 "1, 1, 2, 8, 8, 16, 8, 8, False, 0)", "ValueError", "rope: inv_freq:"),
    "silu_mul: output too small": ("t = torch.randn(4, 16); _cpu.silu_mul(keep(torch.empty(1)), keep(t), 4, 8, 16, 0)",
                                   "ValueError", "silu_mul: out:"),
    "gelu: unknown dtype": ("t = torch.randn(4, 16); _cpu.gelu(keep(torch.empty(4, 16)), keep(t), 4, 16, 16, False, 3)",
                            "ValueError", "gelu: dtype"),
    "pack_dense: packed buffer too small": ("t = torch.randn(64, 32); _cpu.pack_dense(keep(torch.empty(4)), keep(t), "
                                            "64, 32, 32, 4)", "ValueError", "pack_dense: packed:"),
    # step plans: add() checks each node against its slots, run() the step's buffers and values
    "plan: a ref past its fixed slot": ("plan([(P_EMBEDDING, [[10, 0, 0], [0, 0, 0], [9, 8, 0]], "
                                        "[2, 8, 8, 4, -1, 0, 10], 0.0)])", "ValueError",
                                        "plan node 0 (embedding): table: needs bytes [8, 328) of slot 9, which holds 320"),
    "plan: an output past its slot": ("plan([(P_ADD, [[10, 32, 0], [9, 0, 0], [9, 0, 0]], [16, 0], 0.0)])",
                                      "ValueError", "plan node 0 (add): out: needs bytes [32, 96) of slot 10"),
    "plan: a negative offset": ("plan([(P_ROWS_COPY, [[10, -4, 0], [9, 0, 0]], [2, 8, 8, 4], 0.0)])", "ValueError",
                                "out: expected a byte offset >= 0"),
    "plan: a slot out of range": ("plan([(P_ROWS_COPY, [[10, 0, 0], [99, 0, 0]], [2, 8, 8, 4], 0.0)])", "ValueError",
                                  "x: slot 99 out of range"),
    "plan: a missing ref": ("plan([(P_RMS_NORM, [[10, 0, 0], [9, 0, 0], [-1, 0, 0]], [2, 8, 8, 0], 1e-6)])",
                            "ValueError", "weight: slot -1 out of range"),
    "plan: too few refs": ("plan([(P_RMS_NORM, [[10, 0, 0], [9, 0, 0]], [2, 8, 8, 0], 1e-6)])", "ValueError",
                           "expected 3 refs, got 2"),
    "plan: an unknown op": ("plan([(42, [], [], 0.0)])", "ValueError", "unknown op code 42"),
    "plan: a linear past its weights": ("FIXED.extend([torch.empty(2, 4096), w.payload]); plan([(P_LINEAR, [[11, 0, 0], "
                                        "[9, 0, 0], [12, 0, 0], [-1, 0, 0]], [2, 4096, 32, 8, 0, 0, 0], 0.0)])",
                                        "ValueError", "plan node 0 (linear): weights: needs bytes [0, 524288) of "
                                        "slot 12, which holds 8192"),
    "plan: cache rows in a fixed slot": ("plan([(P_ATTENTION, [[7, 0, 0], [6, 0, 0], [8, 0, 64], [8, 0, 64], "
                                         "[2, 0, 0], [3, 0, 0]], ATT[2], 0.25)])", "ValueError",
                                         "k: KV-cache rows must be in a dynamic slot"),
    "plan: cache row bytes that disagree": ("plan([(P_ATTENTION, [[7, 0, 0], [6, 0, 0], [4, 0, 32], [5, 0, 32], "
                                            "[2, 0, 0], [3, 0, 0]], ATT[2], 0.25)])", "ValueError",
                                            "k: cache rows of 32 bytes per position, the node's sizes give 64"),
    "plan: a KV write into a cache of an unknown dtype": ("plan([(P_KV_WRITE, KVW[1], KVW[2][:11] + [7], 0.0)])",
                                                          "ValueError", "cache dtype: expected a dtype code 0 (fp32), "
                                                                        "1 (fp16) or 2 (bf16), got 7"),
    "plan: a bf16 cache where the rows hold fp32": ("plan([(P_ATTENTION, ATT[1], ATT[2] + [2], 0.25)])", "ValueError",
                                                    "k: cache rows of 64 bytes per position, the node's sizes give 32"),
    "plan: a KV write into plain memory": ("plan([(P_KV_WRITE, [[4, 0, 0], [5, 0, 64]] + KVW[1][2:], KVW[2], 0.0)])",
                                           "ValueError", "k cache: expected KV-cache rows"),
    "plan run: wrong number of step buffers": ("plan([ATT]).run([(0, 0)] * 4, 0, T)", "ValueError",
                                               "expected 6 step buffers, got 4"),
    "plan run: cache smaller than row0 + B rows of T": ("step(plan([ATT]), row0=2)", "ValueError",
                                                         "plan run: KV-cache slot 4: the call needs"),
    "plan run: T past the cache": ("step(plan([KVW, ATT]), row0=0, T=20)", "ValueError", "KV-cache slot 4"),
    "plan run: negative row0": ("step(plan([ATT]), row0=-1)", "ValueError", "row0: expected"),
    "plan run: kv_len past T": ("step(plan([ATT]), q_pos=0, kv_len=T + 1)", "ValueError",
                                "plan run (attention): kv_len: expected values in [0, 8]"),
    "plan run: more new keys than the step has": ("step(plan([KVW]), q_pos=0, kv_len=5)", "ValueError",
                                                  "plan run (kv_write): kv_len - q_pos: expected 0..1 new tokens"),
    "plan run: negative q_pos": ("step(plan([ATT]), q_pos=-3, kv_len=1)", "ValueError", "q_pos: expected positions"),
    "plan run: id past the table": ("step(plan([EMB]), ids=(3, 10))", "ValueError",
                                    "plan run (embedding): ids: expected every id in [0, 10)"),
    "plan run: a step buffer too small": ("step(plan([ATT]), caches=[keep(kc), keep(torch.randn(1, 1, T, D))])",
                                          "ValueError",
                                          "KV-cache slot 5"),
    "plan run: ids buffer too small": ("step(plan([EMB]), ids=(3,))", "ValueError",
                                       "plan run: step buffer 0: the call needs 16 bytes, the buffer holds 8"),
}


def test_bad_native_calls_raise_instead_of_crashing():
    """All cases in one child process (one torch import); a case that kills it is named by its BEGIN line."""
    code = PRELUDE
    for name, (case, _, _) in sorted(CASES.items()):
        # each case on a fresh handle and plan buffers (cases mutate them)
        setup = "w = cpu.prepare_linear(torch.randn(64, 32)); FIXED[5:] = []"
        code += f"{setup}\nprint('BEGIN\\t' + {name!r}, flush=True)\ntry:\n"
        code += textwrap.indent(textwrap.dedent(case).strip(), "    ")
        code += f"""
except BaseException as exc:
    print('RAISED\\t' + {name!r} + '\\t' + type(exc).__name__ + '\\t' + str(exc).replace(chr(10), ' ')[:300], flush=True)
else:
    print('NO ERROR\\t' + {name!r}, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    begun = [line.split("\t")[1] for line in lines if line.startswith("BEGIN")]
    assert proc.returncode == 0, (f"the process died (status {proc.returncode}) in case {begun[-1] if begun else '?'}: "
                                  f"{proc.stderr[-2000:]}")
    assert "VALID CALLS OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    raised = {line.split("\t")[1]: line.split("\t")[2:] for line in lines if line.startswith("RAISED")}
    assert set(raised) == set(CASES), f"no exception for {sorted(set(CASES) - set(raised))}:\n{proc.stdout}"
    wrong = {name: raised[name] for name, (_, kind, text) in CASES.items()
             if raised[name][0] != kind or text not in raised[name][1]}
    assert not wrong, "exceptions without the expected type or message:\n" + "\n".join(
        f"  {name}: expected {CASES[name][1]} containing {CASES[name][2]!r}, got {got}" for name, got in wrong.items())
