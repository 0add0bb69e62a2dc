"""Step plans vs the op path (runtime/graph.py): the same greedy tokens and logits within the ops'
budgets, on every backend here, for one prompt, a padded batch and rows of a cache driven one
slice at a time (the server's slots); a plan refuses a shape it was not built for."""
import math

import pytest
import torch

import portinfer
from portinfer.runtime import graph

import hf_models
from conftest import available_backends

PROMPTS = hf_models.PROMPTS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans_llama")
    hf_models.build("qwen2_bias_tied", path, layers=2)
    return path


def plan_backends():
    # the triton interpreter runs a whole tiny model in a few seconds: plans are checked there too
    return ["reference"] + available_backends()


def _load(path, backend, plans):
    dtype = "fp16" if backend == "npu-sim" else "fp32"
    return portinfer.load(path, backend=backend, dtype=dtype, fallback="allow", plans=plans)


@pytest.mark.parametrize("backend", plan_backends())
def test_plans_give_the_op_paths_tokens(tiny, backend):
    steps = 6 if backend == "triton" else 16
    op_path, planned = _load(tiny, backend, False), _load(tiny, backend, True)
    one = [m.generate(PROMPTS[0], max_new_tokens=steps, eos_token_id=[]).token_ids for m in (op_path, planned)]
    assert one[0] == one[1], f"{backend}: one prompt"
    batch = [[g.token_ids for g in m.generate(PROMPTS, max_new_tokens=steps, eos_token_id=[])]
             for m in (op_path, planned)]
    assert batch[0] == batch[1], f"{backend}: padded batch"
    assert planned.decoder._plans, "no plan was built"


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_plan_logits_match_the_op_path_step_by_step(tiny, backend):
    """Rows of one cache driven in slices (a prefill chunk on one row, decode over all with idle
    rows), as the server does: every step's logits equal the op path's within fp32 rounding."""
    if backend not in plan_backends():
        pytest.skip(f"backend {backend} is not available here")
    models = [_load(tiny, backend, False), _load(tiny, backend, True)]
    caches = [m.new_cache(3, 40) for m in models]
    script = [  # (ids [b, S], n_new, rows)
        (torch.tensor([PROMPTS[2][:8]]), None, slice(1, 2)),
        (torch.tensor([PROMPTS[2][8:]]), None, slice(1, 2)),
        (torch.tensor([PROMPTS[0]]), None, slice(0, 1)),
        (torch.tensor([[3], [4], [0]]), [1, 1, 0], None),
        (torch.tensor([[5], [6], [0]]), [1, 1, 0], None),
        (torch.tensor([PROMPTS[1] + [0] * 3, [9] * 5]), [2, 5], slice(1, 3)),
        (torch.tensor([[7], [8], [9]]), None, None),
    ]
    for i, (ids, n_new, rows) in enumerate(script):
        out = [m.step(ids, c, n_new, rows) for m, c in zip(models, caches)]
        live = [b for b in range(ids.shape[0]) if n_new is None or n_new[b]]
        err = float((out[1][live] - out[0][live]).norm() / out[0][live].norm())
        assert err <= 1e-6, f"{backend} step {i}: plan vs op path relative error {err:.2e}"
        assert caches[0].filled == caches[1].filled
    for layer in range(len(caches[0].k)):
        for b, n in enumerate(caches[0].filled):
            torch.testing.assert_close(caches[1].k[layer][b, :, :n], caches[0].k[layer][b, :, :n])


def test_a_plan_refuses_another_shape(tiny):
    model = _load(tiny, "torch", True)
    cache = model.new_cache(2, 32)
    model.step(torch.tensor([[1, 2], [3, 4]]), cache)
    executor = next(iter(model.decoder._plans.values()))
    other = graph.StepInputs.build(torch.tensor([[1, 2, 3], [4, 5, 6]]), [3, 3], [2, 2], cache, slice(0, 2),
                                   model.device)
    with pytest.raises(graph.PlanShapeError, match=r"built for 2 rows x 2 tokens.*asked to run 2 x 3"):
        executor.run(other)
    # through the public API a new shape gets its own plan
    model.step(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
    assert len(model.decoder._plans) == 2


def test_placement_report_counts_plan_runs(tiny):
    model = _load(tiny, "torch", True)
    model.generate(PROMPTS[0], max_new_tokens=5, eos_token_id=[])
    rows = {r.op: r.calls for r in model.placement().rows}
    # 1 prefill + 4 decode steps, 2 layers: 4 linears a layer + the head
    assert rows["linear"] == 5 * (2 * 4 + 1)
    assert rows["attention"] == 5 * 2


def test_step_rejects_bad_rows_and_counts(tiny):
    model = _load(tiny, "torch", True)
    cache = model.new_cache(2, 16)
    with pytest.raises(ValueError, match="rows"):
        model.step(torch.tensor([[1, 2]]), cache, rows=[0])
    with pytest.raises(ValueError, match=r"input_ids: 1 rows, but rows=.* selects 2"):
        model.step(torch.tensor([[1, 2]]), cache, rows=slice(0, 2))
    with pytest.raises(ValueError, match="n_new"):
        model.step(torch.tensor([[1, 2], [3, 4]]), cache, n_new=[3, 1])
    with pytest.raises(ValueError, match="cache: 18 positions needed, the cache holds 16"):
        model.step(torch.tensor([[1] * 18, [1] * 18]), cache)
    with pytest.raises(ValueError, match="expected shape"):
        model.prefill(torch.tensor([1, 2, 3]), cache)
    cache.filled[:] = [16, 3]
    cache.reset(0)
    assert cache.filled == [0, 3]


def test_cpu_backend_compiles_plans_natively(tiny):
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built here")
    from portinfer.backends.cpu_plan import CpuPlanExecutor
    model = _load(tiny, "cpu", True)
    model.generate(PROMPTS, max_new_tokens=3, eos_token_id=[])
    kinds = {type(e).__name__ for e in model.decoder._plans.values()}
    assert kinds == {CpuPlanExecutor.__name__}, kinds


def test_cpu_plan_reuses_buffers_by_liveness(tmp_path):
    """A compiled cpu plan holds about one layer's values, not every layer's: with 6 layers its buffers
    are well under the sum of all its op outputs, and its logits are still the op path's, prefill and
    decode (buffers reused between layers must not be read after they were overwritten)."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built here")
    hf_models.build("qwen2_bias_tied", tmp_path, layers=6)
    plan_model, op_model = _load(tmp_path, "cpu", True), _load(tmp_path, "cpu", False)
    ids = torch.tensor([PROMPTS[2]])
    caches = [m.new_cache(1, 32) for m in (plan_model, op_model)]
    for step in range(3):
        got, want = (m.step(ids, c) for m, c in zip((plan_model, op_model), caches))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ids = want.argmax(-1).view(1, 1)
    for executor in plan_model.decoder._plans.values():
        all_outputs = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                          for shape, dtype in executor._virtual)
        assert executor.buffer_bytes < all_outputs / 3, (executor.buffer_bytes, all_outputs)


def test_a_plan_refuses_a_cache_of_another_model(tiny, tmp_path):
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built here")
    other_path = tmp_path / "other"
    hf_models.build("llama_head_dim", other_path, layers=3)
    model, other = _load(tiny, "cpu", True), _load(other_path, "cpu", True)
    cache = model.new_cache(1, 16)
    model.step(torch.tensor([[1, 2]]), cache)
    executor = next(iter(model.decoder._plans.values()))
    inputs = graph.StepInputs.build(torch.tensor([[1, 2]]), [2], [0], other.new_cache(1, 16), slice(0, 1),
                                    model.device)
    with pytest.raises(graph.PlanShapeError, match="cache: expected 2 layers"):
        executor.run(inputs)


def test_graph_executor_replays_static_buffers(tiny, monkeypatch):
    """The CUDA-graph executor's logic without a GPU: capture = run on static buffers, replay =
    the same run again after the step's inputs were copied in (what a graph replay does)."""
    from portinfer.backends.torch_backend import TorchBackend
    monkeypatch.setattr(TorchBackend, "compile",
                        lambda self, plan: graph.GraphExecutor(plan, graph_factory=graph._ReplayByRerun))
    op_path, replayed = _load(tiny, "torch", False), _load(tiny, "torch", True)
    expected = [g.token_ids for g in op_path.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])]
    assert [g.token_ids for g in replayed.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])] == expected
    executors = list(replayed.decoder._plans.values())
    assert any(isinstance(e, graph.GraphExecutor) and e.graphs for e in executors)


def test_cpu_int8_route_runs_natively_and_gives_the_op_paths_tokens(monkeypatch):
    """Weights repacked for the cpu backend's int8 route take their own kernel inside a native plan."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built here")
    from portinfer.backends.cpu_plan import CpuPlanExecutor
    from portinfer.runtime.loader import default_model_path
    monkeypatch.setenv("PORTINFER_CPU_QUANT_ROUTE", "int8")
    models = [portinfer.load(default_model_path(), backend="cpu", plans=p) for p in (False, True)]
    assert models[1].decoder.layers[0]["qkv"].extra.get("layout") == "int8x16"
    prompts = ["The capital of France is", "One, two, three,"]
    tokens = [[g.token_ids for g in m.generate(prompts, max_new_tokens=8, eos_token_id=[])] for m in models]
    assert tokens[0] == tokens[1]
    assert {type(e) for e in models[1].decoder._plans.values()} == {CpuPlanExecutor}


@pytest.mark.parametrize("arch", ["qwen3", "glm4"])
def test_new_architectures_compile_natively_on_cpu(arch, tmp_path):
    """Qwen3's per-head q/k norms (heads copied out as rows) and GLM-4-0414's extra norms run inside
    the one native call, with the op path's tokens."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built here")
    from portinfer.backends.cpu_plan import CpuPlanExecutor
    hf_models.build(arch, tmp_path / arch)
    models = [_load(tmp_path / arch, "cpu", p) for p in (False, True)]
    tokens = [[g.token_ids for g in m.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])] for m in models]
    assert tokens[0] == tokens[1]
    assert {type(e) for e in models[1].decoder._plans.values()} == {CpuPlanExecutor}


def test_cpu_plans_of_two_models_share_the_arena_safely(tiny, tmp_path):
    """Every compiled cpu plan's intermediate values live in one arena (cpu_plan._Arena): steps of two
    models and of several shape classes, interleaved, still give each op path's logits (no value is read
    across steps), and a plan needing more memory than the arena holds gets a larger block."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend's extension is not built here")
    from portinfer.backends import cpu_plan

    other_path = tmp_path / "other"
    hf_models.build("llama_head_dim", other_path, layers=3)
    pairs = [(_load(p, "cpu", True), _load(p, "cpu", False)) for p in (tiny, other_path)]
    caches = [[m.new_cache(2, 48) for m in pair] for pair in pairs]
    script = [torch.tensor([PROMPTS[0][:5], PROMPTS[2][:5]]), torch.tensor([[3], [4]]),
              torch.tensor([PROMPTS[2][:12], PROMPTS[2][1:13]]), torch.tensor([[5], [6]])]
    for ids in script:
        for (planned, op_path), (c_plan, c_op) in zip(pairs, caches):
            torch.testing.assert_close(planned.step(ids, c_plan), op_path.step(ids, c_op), rtol=1e-5, atol=1e-5)
    blocks = {e._buffers[0].untyped_storage().data_ptr() for planned, _ in pairs
              for e in planned.decoder._plans.values()}
    assert cpu_plan._ARENA._block.numel() >= max(e._buffers[0].numel() for planned, _ in pairs
                                                 for e in planned.decoder._plans.values())
    assert len(blocks) < sum(len(planned.decoder._plans) for planned, _ in pairs)  # shared, not one each
