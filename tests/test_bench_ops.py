"""`portinfer bench ops`: the cost model against hand-computed values (one shape per op, the
arithmetic written out independently of portinfer/bench/ops.py), the shape sets against the
model configs they name, and a CLI smoke run on the `tiny` shapes writing JSON, CSV and PNGs."""
import csv
import json
import math

import pytest
import torch

from portinfer import cli
from portinfer.backends import quant, registry
from portinfer.backends.base import attention_mask
from portinfer.backends.torch_backend import TorchBackend
from portinfer.bench import ops
from portinfer.bench.shapes import SHAPE_SETS, parse_shapes


def _case(shapes, op, name, phase, weight_format=None):
    cases = [c for c in ops.build_cases(SHAPE_SETS[shapes]) if (c.op, c.name, c.phase) == (op, name, phase)
             and (weight_format is None or c.weight_format == weight_format)]
    assert len(cases) == 1, cases
    return cases[0]


# (op, case, phase, weight format, dtype) on SmolLM2-135M (hidden 576, intermediate 1536, 9/3 heads,
# head_dim 64, vocab 49152, prefill 128 tokens, decode context 1024) -> (flops, bytes), by hand:
HAND_COMPUTED = [
    # qkv: N = (9 + 2*3) * 64 = 960, K = 576, M = 1: 2*1*960*576; x 576*4 + y 960*4 + w 960*576*4
    (("linear", "qkv", "decode", "dense", torch.float32), (1_105_920, 2_304 + 3_840 + 2_211_840)),
    # same shape from Q4_0 blocks: 576/32 = 18 blocks of 18 bytes per row -> w = 960*18*18
    (("linear", "qkv", "decode", "q4_0", torch.float32), (1_105_920, 2_304 + 3_840 + 311_040)),
    # gate_up prefill: M 128, K 576, N 3072, bf16 activations, Q8_0 (34-byte blocks): w = 3072*18*34
    (("linear", "gate_up", "prefill", "q8_0", torch.bfloat16), (452_984_832, 147_456 + 786_432 + 1_880_064)),
    # down decode, Q4_1 (20-byte blocks): K 1536 -> 48 blocks; w = 576*48*20; x 1536*4; y 576*4
    (("linear", "down", "decode", "q4_1", torch.float32), (1_769_472, 6_144 + 2_304 + 552_960)),
    # lm_head decode, bf16: 2*49152*576; x 576*2 + y 49152*2 + w 49152*576*2
    (("linear", "lm_head", "decode", "dense", torch.bfloat16), (56_623_104, 1_152 + 98_304 + 56_623_104)),
    # embedding prefill: ids 128*8, 128 rows of 576 fp32 read, and written
    (("embedding", "embedding", "prefill", None, torch.float32), (0, 1_024 + 294_912 + 294_912)),
    # rms_norm prefill: 128*576 = 73728 elements, 4 flops each; x + y + weight[576] in fp32
    (("rms_norm", "rms_norm", "prefill", None, torch.float32), (294_912, 294_912 + 294_912 + 2_304)),
    # layer_norm decode bf16: 576 elements, 7 flops each; x + y + weight + bias, 2 bytes each
    (("layer_norm", "layer_norm", "decode", None, torch.bfloat16), (4_032, 1_152 + 1_152 + 1_152 + 1_152)),
    # rope prefill: q [1, 9, 128, 64] = 73728 elements, 3 flops each; read + write fp32, pos int64 [1, 128]
    (("rope", "rope", "prefill", None, torch.float32), (221_184, 294_912 + 294_912 + 1_024)),
    # silu_mul decode bf16: x [1, 3072] -> [1, 1536]: 4 flops per output; 3072*2 + 1536*2
    (("silu_mul", "silu_mul", "decode", None, torch.bfloat16), (6_144, 6_144 + 3_072)),
    # gelu prefill fp32: [128, 1536] = 196608 elements, 5 flops each; read + write
    (("gelu", "gelu", "prefill", None, torch.float32), (983_040, 786_432 + 786_432)),
    # causal prefill attention: 128*129/2 = 8256 visible pairs, 4 * 9 heads * 64 per pair;
    # q + out: 2 * 9*128*64*4, k + v: 2 * 3*128*64*4, q_pos + kv_len: 2 int32
    (("attention", "attention", "prefill", None, torch.float32), (19_021_824, 589_824 + 196_608 + 8)),
    # decode attention: 1 query over 1024 keys; q + out 2*9*64*4, k + v 2*3*1024*64*4
    (("attention", "attention", "decode", None, torch.float32), (2_359_296, 4_608 + 1_572_864 + 8)),
]


@pytest.mark.parametrize("key, expected", HAND_COMPUTED, ids=lambda v: "-".join(map(str, v[:4])) if len(v) == 5 else None)
def test_cost_matches_hand_computed_values(key, expected):
    op, name, phase, fmt, dtype = key
    assert ops.cost(_case("smollm2-135m", op, name, phase, fmt), dtype) == expected


def test_quantized_weight_bytes_match_the_blocks_gguf_writes():
    # independent of the formula: the byte count of what gguf's reference quantizer produces
    for fmt in ("q8_0", "q4_0", "q4_1"):
        blocks = quant.quantize(torch.randn(40, 96), fmt)
        assert ops.weight_bytes(40, 96, fmt, torch.float32) == blocks.nbytes


def test_attention_pairs_match_the_contract_mask():
    # the visible (query, key) pairs counted by the contract's own mask (backends.base.attention_mask)
    for Sq, q_pos, kv_len, Sk in ((7, 0, 7, 7), (1, 30, 31, 40), (5, 10, 12, 16)):
        mask = attention_mask(torch.tensor([q_pos], dtype=torch.int32), torch.tensor([kv_len], dtype=torch.int32),
                              Sq, Sk, True, "cpu")
        assert ops.visible_pairs(Sq, q_pos, kv_len) == int(mask.sum())


def test_shape_sets_carry_the_configs_dims():
    # (hidden, intermediate, heads, kv_heads, head_dim, vocab) from each model's config.json
    expected = {"smollm2-135m": (576, 1536, 9, 3, 64, 49152), "qwen2-0.5b": (896, 4864, 14, 2, 64, 151936),
                "llama-3-8b": (4096, 14336, 32, 8, 128, 128256)}
    for name, dims in expected.items():
        s = SHAPE_SETS[name]
        assert (s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, s.vocab) == dims
        assert s.heads * s.head_dim == s.hidden
    qkv = _case("llama-3-8b", "linear", "qkv", "prefill", "dense")
    assert qkv.params == {"M": 128, "K": 4096, "N": (32 + 2 * 8) * 128}


def test_custom_shapes_parse_and_bad_specs_name_the_problem():
    s = parse_shapes("custom:hidden=128,intermediate=256,heads=4,kv_heads=1,head_dim=32,vocab=1000,tokens=16")
    assert (s.hidden, s.heads, s.kv_heads, s.tokens, s.context) == (128, 4, 1, 16, 1024)
    with pytest.raises(ValueError, match="missing vocab"):
        parse_shapes("custom:hidden=128,intermediate=256,heads=4,kv_heads=1,head_dim=32")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        parse_shapes("custom:hidden=128,intermediate=256,heads=4,kv_heads=3,head_dim=32,vocab=10")
    with pytest.raises(ValueError, match="expected one of smollm2-135m"):
        parse_shapes("gpt-5")


def test_input_sets_cover_twice_the_cache():
    assert ops.input_sets(1 << 20, 32 << 20) == 64
    assert ops.input_sets(100 << 20, 32 << 20) == 1
    assert ops.input_sets(10, 32 << 20, max_sets=16) == 16


# ----------------------------------------------------------------------------------------------
# the CLI smoke run

ROW_NUMBERS = ("flops", "bytes", "median_s", "q1_s", "q3_s", "min_s", "max_s", "gflop_s", "gb_s", "floor_s",
               "roofline_fraction", "speedup_vs_torch", "repeats", "calls_per_repeat", "input_sets")


def _positive_finite(value, where):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{where}: {value!r} is not positive and finite"


class TwinBackend(TorchBackend):
    """A second backend for the harness to time: torch's code under another name, without rope
    (so the run must report it as not supported rather than fail)."""

    name = "twin"

    def supports(self, op, **meta):
        return op != "rope" and super().supports(op, **meta)


class InterpreterOnly(TorchBackend):
    name = "interp-only"

    @classmethod
    def auto_eligible(cls):
        return False


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "ops.json", "csv": out / "ops.csv", "plot": out / "ops.png"}
    argv = ["bench", "ops", "--backends", "twin", "--shapes", "tiny", "--repeats", "3", "--warmup", "1",
            "--min-time-s", "0.001", "--max-input-sets", "4", "--matmul-n", "256", "--copy-mib", "8",
            "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["plot"])]
    registry.register("twin", TwinBackend)
    try:
        assert cli.main(argv) == 0
    finally:
        registry.unregister("twin")
    return json.loads(paths["json"].read_text()), paths


def test_default_backends_are_the_available_auto_eligible_ones():
    registry.register("interp-only", InterpreterOnly)
    try:
        chosen = ops.default_backends()
    finally:
        registry.unregister("interp-only")
    expected = [n for n in registry.names() if n not in ("reference", "interp-only")
                and registry.available(n) and registry.entry(n).cls.auto_eligible()]
    assert chosen == expected and "torch" in chosen and "reference" not in chosen


def test_torch_baseline_is_added_on_each_device():
    registry.register("twin", TwinBackend)
    try:
        names = [(b.name, b.device.type) for b in ops.instantiate(["twin:cpu"])]
    finally:
        registry.unregister("twin")
    assert names == [("torch", "cpu"), ("twin", "cpu")]


def test_smoke_json_schema_and_every_figure_positive_finite(tiny_run):
    doc, _ = tiny_run
    assert doc["schema"] == "portinfer.bench.ops/1"
    p = doc["provenance"]
    for key in ("command", "date", "cpu", "threads", "torch", "triton", "git_commit", "load_avg_start", "load_avg_end"):
        assert key in p, key
    assert p["command"].startswith("portinfer bench ops") and "--shapes tiny" in p["command"]
    assert p["threads"] == torch.get_num_threads() and p["torch"] == torch.__version__
    cpu = doc["ceilings"]["cpu"]
    for dtype in ("fp32", "bf16"):
        _positive_finite(cpu["matmul"][dtype]["flop_s"], f"matmul {dtype}")
    _positive_finite(cpu["copy"]["bytes_s"], "copy")
    assert not [s for s in doc["skipped"] if s["kind"] == "error"], doc["skipped"]

    rows = doc["rows"]
    expected_cases = {(c.op, c.name, c.phase, c.weight_format) for c in ops.build_cases(SHAPE_SETS["tiny"])}
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    seen = {(r["op"], r["case"], r["phase"], "dense" if r["weight_format"] in ("fp32", "bf16") else r["weight_format"],
             r["dtype"]) for r in torch_rows}
    # the torch baseline ran every case in both default dtypes
    assert seen == {(*c, d) for c in expected_cases for d in ("fp32", "bf16")}
    for r in rows:
        where = f"{r['backend']} {r['op']}.{r['case']} {r['phase']} {r['dtype']} {r['weight_format']}"
        for key in ROW_NUMBERS:
            if key == "gflop_s" and r["op"] == "embedding":
                assert r[key] is None and r["flops"] == 0, where  # a gather does no arithmetic
                continue
            if key == "flops" and r["op"] == "embedding":
                continue
            _positive_finite(r[key], f"{where} {key}")
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"] and r["min_s"] <= r["q1_s"] and r["q3_s"] <= r["max_s"], where
        # derived figures follow from the measured ones and this run's ceilings
        assert r["gb_s"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["roofline_fraction"] == pytest.approx(r["floor_s"] / r["median_s"])
        peak = max(cpu["matmul"]["fp32"]["flop_s"], cpu["matmul"][r["dtype"]]["flop_s"])
        assert r["floor_s"] == pytest.approx(max(r["flops"] / peak, r["bytes"] / cpu["copy"]["bytes_s"]))


def test_smoke_speedup_vs_torch_is_consistent(tiny_run):
    doc, _ = tiny_run
    key = lambda r: (r["shapes"], r["op"], r["case"], r["phase"], r["shape"], r["dtype"], r["weight_format"],
                     r["device"])
    baseline = {}
    for r in doc["rows"]:
        if r["backend"] == "torch":
            assert key(r) not in baseline
            baseline[key(r)] = r["median_s"]
            assert r["speedup_vs_torch"] == 1.0  # the baseline against itself
    twin = [r for r in doc["rows"] if r["backend"] == "twin"]
    # the twin ran every case the baseline ran except rope, which it declares unsupported
    assert {key(r) for r in twin} == {k for k in baseline if k[1] != "rope"}
    for r in twin:
        assert r["speedup_vs_torch"] == pytest.approx(baseline[key(r)] / r["median_s"])
    not_run = [s for s in doc["skipped"] if s["backend"] == "twin"]
    assert {s["op"] for s in not_run} == {"rope"} and all(s["kind"] == "unsupported" for s in not_run)


def test_smoke_csv_and_plots(tiny_run):
    doc, paths = tiny_run
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(doc["rows"])
    assert [float(r["median_s"]) for r in table] == [r["median_s"] for r in doc["rows"]]
    for png in (paths["plot"], paths["plot"].with_name("ops-speedup.png")):
        import matplotlib.image
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 600, png
        assert image[..., :3].std() > 0.01, f"{png} is blank"


def test_unknown_backend_and_bad_options_fail_before_any_timing(capsys):
    assert cli.main(["bench", "ops", "--backends", "nope", "--shapes", "tiny"]) == 2
    assert "unknown name 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "ops", "--shapes", "custom:hidden=8"]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli.main(["bench", "ops", "--shapes", "tiny", "--json", "/nonexistent-folder/x.json"]) == 2
    assert "--json: the folder of /nonexistent-folder/x.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "ops", "--repeats", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_smoke_table_has_the_ceilings_and_one_line_per_row(tiny_run):
    from portinfer.bench import report
    doc, _ = tiny_run
    table = report.format_table(doc)
    assert f"fp32 {doc['ceilings']['cpu']['matmul']['fp32']['flop_s'] / 1e9:.4g} GFLOP/s" in table
    body = [line for line in table.splitlines() if line.split()[:1] and line.split()[0].startswith(ops.BENCH_OPS)]
    assert len(body) == len(doc["rows"])
    assert "not run" in table and "twin rope" in table  # the unsupported cases are listed, not hidden


def test_threads_reach_torch_and_backend_pools_and_are_put_back():
    seen = {"pool": 2}

    class Pooled(TorchBackend):
        name = "pooled"

        def set_num_threads(self, n):
            seen["pool"] = n
            seen.setdefault("set", []).append(n)

        def num_threads(self):
            return seen["pool"]

    before = torch.get_num_threads()
    registry.register("pooled", Pooled)
    try:
        doc = ops.run_ops(["pooled"], [SHAPE_SETS["tiny"]], ops=["rms_norm"], dtypes=["fp32"], repeats=2,
                          min_time_s=0.001, threads=1, matmul_n=256, copy_bytes=8 << 20)
    finally:
        registry.unregister("pooled")
    assert doc["provenance"]["threads"] == 1  # torch ran the measurement on one thread
    assert seen["set"] == [1, 2]  # the backend's pool was set to 1, then put back
    assert torch.get_num_threads() == before
    assert {r["backend"] for r in doc["rows"]} == {"torch", "pooled"}
