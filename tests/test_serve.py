"""`portinfer serve`: the real server (uvicorn in a thread, a free loopback port), talked to with the
official openai client and with httpx for raw and malformed requests. Nothing is mocked.

The model is a tiny random decoder with a one-character-per-token tokenizer (serve_models.py):
a response's text identifies its tokens. References are computed by a second, independent
instance of the same model through the library (`model.generate`, `model.logits`).
"""
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the server tests talk through the official openai client")
import httpx  # noqa: E402

import portinfer  # noqa: E402
from portinfer.serve.app import Server, create_app  # noqa: E402

import serve_models  # noqa: E402

PROMPT = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    serve_models.build_chat_model(path)
    return path


@pytest.fixture(scope="module")
def reference(chat_dir):
    """The same model, loaded separately: the library's answers are the reference."""
    return portinfer.load(chat_dir)


@pytest.fixture(scope="module")
def server(chat_dir):
    model = portinfer.load(chat_dir)
    app = create_app(model, max_batch=8, max_context=128, max_queue=64, prefill_chunk=16)
    with Server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def metric(url, name):
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1))


def ref_generate(model, prompt, **kw):
    kw.setdefault("temperature", 0)
    return model.generate(prompt, **kw)


# ---------------------------------------------------------------------- endpoints and fields

def test_chat_completion_equals_the_library(client, reference):
    r = client.chat.completions.create(model="tiny-chat", messages=PROMPT, max_tokens=12, temperature=0)
    prompt = reference.apply_chat_template(PROMPT)
    want = ref_generate(reference, prompt, max_new_tokens=12)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(reference.encode(prompt))
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.total_tokens == r.usage.prompt_tokens + len(
        want.token_ids)
    assert r.object == "chat.completion" and r.model == "tiny-chat"


def test_streaming_chat_sends_the_same_text_then_usage_and_done(client, server):
    kw = dict(model="tiny-chat", messages=PROMPT, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # raw SSE: data lines, the last one [DONE]; without include_usage the final chunk still has usage
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json={**kw, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == whole.usage.completion_tokens


def test_completions_prompts_n_seed_and_stop(client, reference):
    r = client.completions.create(model="tiny-chat", prompt=["Once upon", "The capital"], max_tokens=10, n=2,
                                  temperature=1.0, seed=7, extra_body={"ignore_eos": True, "top_k": 20})
    again = client.completions.create(model="tiny-chat", prompt=["Once upon", "The capital"], max_tokens=10, n=2,
                                      temperature=1.0, seed=7, extra_body={"ignore_eos": True, "top_k": 20})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # the same seed, the same tokens
    assert r.choices[0].text != r.choices[1].text  # choice i samples with seed + i
    # each choice is exactly the library's sampled generation with that seed
    for i, c in enumerate(r.choices):
        prompt = ["Once upon", "The capital"][i // 2]
        want = reference.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=20, seed=7 + i % 2,
                                  eos_token_id=[])
        assert c.text == want.text
    assert r.usage.prompt_tokens == len(reference.encode("Once upon")) + len(reference.encode("The capital"))
    assert r.usage.completion_tokens == 40
    # token-id prompts, and stop strings: the one that occurs first in the text wins
    ids = reference.encode("Once upon")
    full = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    a, b = full[8:10], full[3:5]  # b occurs first in the text, a is listed first
    assert full.find(b) < full.find(a)
    cut = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=24, temperature=0, stop=[a, b],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.find(b)] and cut.finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(client, reference):
    r = client.chat.completions.create(model="tiny-chat", messages=PROMPT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = reference.encode(reference.apply_chat_template(PROMPT))
    gen = reference.generate(ids, max_new_tokens=6, temperature=0).token_ids
    logits = reference.logits(torch.tensor([ids + gen]))[0, len(ids) - 1:-1]  # [6, V]
    want = torch.log_softmax(logits.double(), -1)
    assert len(content) == len(gen)
    for step, (entry, token) in enumerate(zip(content, gen)):
        assert entry.token == reference.tokenizer.decode([token], skip_special_tokens=False)
        assert math.isclose(entry.logprob, want[step, token].item(), abs_tol=1e-4)
        top = torch.topk(want[step], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the top one
    c = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2
    assert "".join(c.choices[0].logprobs.tokens) == c.choices[0].text


def test_presence_and_frequency_penalties_follow_openai(client, reference):
    presence, frequency, steps = 1.5, 0.7, 12
    r = client.completions.create(model="tiny-chat", prompt="abcabc", max_tokens=steps, temperature=0,
                                  presence_penalty=presence, frequency_penalty=frequency,
                                  extra_body={"ignore_eos": True})
    # reference: full forward each step; logit[j] -= count[j] * frequency + (count[j] > 0) * presence
    ids = reference.encode("abcabc")
    generated = []
    for _ in range(steps):
        logits = reference.logits(torch.tensor([ids + generated]))[0, -1].double()
        counts = torch.bincount(torch.tensor(generated, dtype=torch.int64), minlength=logits.numel()).double() \
            if generated else torch.zeros_like(logits)
        generated.append(int((logits - counts * frequency - (counts > 0).double() * presence).argmax()))
    assert r.choices[0].text == reference.tokenizer.decode(generated)
    plain = client.completions.create(model="tiny-chat", prompt="abcabc", max_tokens=steps, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text != r.choices[0].text  # the penalties changed something


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and isinstance(health["plans_to_build"], int) and health["plans_to_build"] >= 0
    text = httpx.get(server[0] + "/metrics").text
    for name in ("portinfer_requests_total", "portinfer_prompt_tokens_total", "portinfer_generation_tokens_total",
                 "portinfer_num_requests_running", "portinfer_num_requests_waiting", "portinfer_kv_slots_used",
                 "portinfer_time_to_first_token_seconds_bucket", "portinfer_inter_token_latency_seconds_bucket"):
        assert name in text


# ---------------------------------------------------------------------- errors

def test_errors_answer_in_openais_shape(client, server):
    url = server[0]

    def error(resp, status):
        assert resp.status_code == status, resp.text
        body = resp.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return body

    body = error(httpx.post(url + "/v1/chat/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400)
    body = error(httpx.post(url + "/v1/chat/completions", json={"messages": PROMPT, "temperature": -1}), 400)
    assert body["param"] == "temperature"
    body = error(httpx.post(url + "/v1/chat/completions", json={"messages": "hi"}), 400)
    body = error(httpx.post(url + "/v1/completions", json={"prompt": [5, 1000]}), 400)
    assert "[0, 98)" in body["message"]
    # prompt + max_tokens over the context: the counts are stated
    long = "x" * 100
    body = error(httpx.post(url + "/v1/completions", json={"prompt": long, "max_tokens": 40}), 400)
    assert body["code"] == "context_length_exceeded" and "128" in body["message"] and "100 in the prompt" in \
        body["message"] and "40 in the completion" in body["message"]
    body = error(httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4", "messages": PROMPT}), 404)
    assert body["code"] == "model_not_found" and body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=PROMPT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=PROMPT, top_p=0)
    body = error(httpx.post(url + "/v1/embeddings", json={"input": "hi"}), 400)
    assert "no embedding output" in body["message"]
    error(httpx.get(url + "/v1/nothing-here"), 404)


def test_api_key(chat_dir):
    model = portinfer.load(chat_dir)
    with Server(create_app(model, api_key="s3cret", max_batch=2, max_context=64)) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        resp = httpx.post(url + "/v1/completions", json={"prompt": "a"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny-chat", prompt="a", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200  # health and metrics stay open


def test_full_queue_answers_429_never_blocks(chat_dir):
    """One slot, a queue of one: with a request streaming in the slot, five more at once get one place
    in the queue (answered in full once the slot frees) and 429s, never a wait without end. The first
    request is known to hold the slot (its first token has arrived) before the five are sent: sent all
    at once, the engine loop might not yet have moved the first out of the queue (then only one of the
    six gets in) or, on a fast machine, already have finished it."""
    model = portinfer.load(chat_dir)
    with Server(create_app(model, max_batch=1, max_context=256, max_queue=1)) as url:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                body = {"prompt": "a", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as first:
                    assert first.status_code == 200
                    lines = first.aiter_lines()
                    while not (await lines.__anext__()).startswith("data: {"):
                        pass  # the first token: the request holds the slot
                    async def drain():  # the first stream read to its end meanwhile
                        return [line async for line in lines]

                    *others, rest = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(5)),
                                                         drain())
                    assert "data: [DONE]" in rest
                return others

        codes = sorted(r.status_code for r in asyncio.run(run()))
        assert codes.count(200) == 1 and codes.count(429) == 4, codes
        resp = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert resp.status_code == 200  # the queue drained


def test_a_failing_request_fails_alone(tmp_path):
    path = tmp_path / "nan-chat"
    serve_models.build_chat_model(path, nan_token="~")
    model = portinfer.load(path)
    with Server(create_app(model, max_batch=4, max_context=128)) as url:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                good = {"prompt": "good prompt", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
                bad = {"prompt": "bad ~ prompt", "max_tokens": 30, "temperature": 0}
                return await asyncio.gather(http.post("/v1/completions", json=good),
                                            http.post("/v1/completions", json=bad),
                                            http.post("/v1/completions", json=good))

        ok1, bad, ok2 = asyncio.run(run())
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "generation_failed"
        assert ok1.status_code == ok2.status_code == 200
        assert ok1.json()["choices"][0]["text"] == ok2.json()["choices"][0]["text"]
        assert ok1.json()["usage"]["completion_tokens"] == 30
        assert metric(url, "portinfer_kv_slots_used") == 0


# ---------------------------------------------------------------------- continuous batching

def prompts_of_different_lengths(n):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly kings".split()
    return [" ".join(words[:1 + (i * 7) % len(words)]) + f" #{i}" * (1 + i % 3) for i in range(n)]


def test_batch_invariance_32_concurrent_greedy_requests(server, reference):
    url, _ = server
    prompts = prompts_of_different_lengths(32)
    body = dict(model="tiny-chat", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    sync = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    alone = [sync.completions.create(prompt=p, **body).choices[0].text for p in prompts[:4]]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(i, p):
            if i % 2:  # half streamed, half not
                chunks = [c async for c in await aclient.completions.create(prompt=p, stream=True, **body)]
                return "".join(c.choices[0].text for c in chunks if c.choices)
            return (await aclient.completions.create(prompt=p, **body)).choices[0].text

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    got = asyncio.run(together())
    assert got[:4] == alone
    for p, text in zip(prompts, got):  # every response equals the same request run alone
        assert text == ref_generate(reference, p, max_new_tokens=12, eos_token_id=[]).text, p
    assert metric(url, "portinfer_num_requests_running") == 0


def test_cancelled_streams_free_their_slots(server):
    url, app = server
    body = {"model": "tiny-chat", "prompt": "cancel me", "max_tokens": 100, "temperature": 0, "stream": True,
            "ignore_eos": True}

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def cancelled():
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            return  # leave after the first token: the connection closes mid-stream

            async def finished():
                r = await http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 10})
                return r.json()["usage"]["completion_tokens"]

            results = await asyncio.gather(*([cancelled() for _ in range(6)] + [finished() for _ in range(4)]))
            return results[6:]

    assert asyncio.run(load()) == [10] * 4
    deadline = time.monotonic() + 10
    while metric(url, "portinfer_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "portinfer_num_requests_running") == 0
    assert metric(url, "portinfer_kv_slots_used") == 0 and metric(url, "portinfer_num_requests_waiting") == 0
    assert app.state.scheduler.steps > 0


def test_bench_serve_load_generator_counts_what_the_server_streams(server):
    """`portinfer bench serve`'s level: c clients, requests back to back; every generated token counted
    (from the streamed usage), TTFT and inter-token gaps measured, nothing left running. Before its
    levels it waits until the server has built its idle step plans."""
    from portinfer.bench.serve import _wait_for_idle_builds, combine_rounds, run_level

    url, _ = server
    assert _wait_for_idle_builds(url, timeout_s=120) is None  # it ran (a coroutine would not have)
    assert httpx.get(url + "/health").json()["plans_to_build"] == 0
    body = {"model": "tiny-chat", "prompt": "count these tokens", "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    level = asyncio.run(run_level(url, 3, 7, body))
    assert level["errors"] == 0 and level["requests"] == 7
    assert level["generated_tokens"] == 7 * 5
    assert level["throughput_tok_s"] == pytest.approx(35 / level["wall_s"])
    assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"] < level["wall_s"]
    assert 0 < level["itl_p50_s"] <= level["itl_p99_s"]
    assert metric(url, "portinfer_num_requests_running") == 0
    # --rounds: a level run again is combined with the first (counts summed, the median round's rate)
    again = asyncio.run(run_level(url, 3, 7, body))
    both = combine_rounds([level, again])
    assert both["requests"] == 14 and both["generated_tokens"] == 70 and both["errors"] == 0
    assert both["throughput_tok_s_each_round"] == [level["throughput_tok_s"], again["throughput_tok_s"]]
    assert both["throughput_tok_s"] == pytest.approx((level["throughput_tok_s"] + again["throughput_tok_s"]) / 2)
    assert len(both["_gaps"]) == len(level["_gaps"]) + len(again["_gaps"]) == 14 * 4
    assert min(level["ttft_p50_s"], again["ttft_p50_s"]) <= both["ttft_p50_s"] <= max(level["ttft_p99_s"],
                                                                                      again["ttft_p99_s"])


def test_sigterm_shuts_down_cleanly(chat_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "portinfer.cli", "serve", str(chat_dir), "--port", str(port),
                             "--max-batch", "2", "--max-context", "256", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        body = {"prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the running request finishes, then the process ends
            rest = [line for line in lines if line]
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 60
        # uvicorn re-raises the signal it caught once shutdown is done: the exit status says SIGTERM
        assert proc.wait(30) in (0, -signal.SIGTERM)
        output = proc.stdout.read().decode()
        assert "Traceback" not in output and "error" not in output.lower(), output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_op_path_serves_the_same_tokens(chat_dir, reference):
    """plans=False: every step on the op path (each op validated and placed per call)."""
    model = portinfer.load(chat_dir, plans=False)
    prompts = prompts_of_different_lengths(8)
    with Server(create_app(model, max_batch=4, max_context=128, prefill_chunk=8)) as url:
        async def run():
            aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            return await asyncio.gather(*(aclient.completions.create(
                model="tiny-chat", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
                for p in prompts))

        got = [r.choices[0].text for r in asyncio.run(run())]
    assert got == [ref_generate(reference, p, max_new_tokens=8, eos_token_id=[]).text for p in prompts]


# ---------------------------------------------------------------------- the engine loop itself

@pytest.mark.parametrize("plans", [True, False])
@pytest.mark.parametrize("lengths, steps_with_plans, steps_on_the_op_path", [
    ((20, 20, 20, 20), 1, 1),  # a burst of equal prompts: one shared step
    ((3, 40, 5), 3, 3),  # a shared step would pad 3 and 5 tokens to 40: a step each, all in the same turn
    # with plans, 20..22 tokens are one length class (24), but 3 rows round up to a 4-row class: 2 + 1;
    # the op path runs exact shapes, where any padding is more rows than a step each
    ((20, 22, 21), 2, 3),
])
def test_a_burst_of_prompts_is_prefilled_in_as_few_rows_as_possible(chat_dir, reference, plans, lengths,
                                                                   steps_with_plans, steps_on_the_op_path):
    """Prompts that arrive together take consecutive slots. A prefill step is a rectangle (rows x the
    longest chunk, with plans rounded up to a shape class), so neighbouring prompts share a step
    exactly when that computes no more token rows than a step each: similar lengths share, different
    lengths do not. Every prompt is read in the first turn (they fit the chunk budget), and every
    sequence gets exactly the tokens it gets alone. Driven turn by turn on this thread (no HTTP)."""
    from portinfer.runtime.sampling import SamplingParams
    from portinfer.serve.scheduler import Job, Scheduler, _prefill_length

    prefill_steps = steps_with_plans if plans else steps_on_the_op_path
    model = portinfer.load(chat_dir, plans=plans)
    prompts = [[3 + (5 * i + 7 * j) % 40 for j in range(n)] for i, n in enumerate(lengths)]
    sched = Scheduler(model, max_batch=8, max_context=128, prefill_chunk=256)
    sched.cache = model.new_cache(sched.max_batch, sched.max_context)
    shapes = []
    step = model.step
    model.step = lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or step(ids, *a, **k)
    out = {i: [] for i in range(len(prompts))}
    jobs = [Job(p, 6, SamplingParams(temperature=0), sink=lambda e, i=i: out[i].append(e), index=i, ignore_eos=True)
            for i, p in enumerate(prompts)]
    sched.submit(jobs)
    sched._turn()  # admits every prompt, reads them all (they fit the budget), decodes once
    assert sched.steps == prefill_steps + 1, shapes
    assert all(state.value == "decode" for state in sched.states[:len(prompts)]), sched.states
    alone = sum(_prefill_length(n) if plans else n for n in lengths)  # token rows of a step each
    assert sum(rows * tokens for rows, tokens in shapes[:-1]) <= alone, shapes
    while any(job.slot is not None for job in jobs):
        sched._turn()
    for i, p in enumerate(prompts):
        want = reference.generate(p, max_new_tokens=6, temperature=0, eos_token_id=[]).token_ids
        assert [e.token_id for e in out[i] if e.kind == "token"] == list(want), i


def test_an_idle_engine_builds_the_common_step_plans(chat_dir, reference):
    """While nothing is queued or running, the loop builds the plans of a decode step of each batch
    class and of a lone prompt's prefill step at each length class (so a first request of a class does
    not trace and compile inside its latency), then leaves every cache row empty; a request afterwards
    gets exactly its tokens alone. Without plans there is nothing to build."""
    from portinfer.runtime.sampling import SamplingParams
    from portinfer.serve.scheduler import Job, Scheduler

    assert Scheduler(portinfer.load(chat_dir, plans=False), max_batch=4).to_warm == []
    model = portinfer.load(chat_dir, plans=True)
    sched = Scheduler(model, max_batch=4, max_context=64, prefill_chunk=32)
    want = [(1, 1), (2, 1), (4, 1), (1, 16), (1, 24), (1, 32)]
    assert sched.to_warm == want
    sched.start()
    try:
        deadline = time.monotonic() + 120  # a class is on the warmed list once its step has finished
        while len(sched.warmed) < len(want) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(r, t) for r, t, _ in sched.warmed] == want
        assert all((rows, tokens, False, True) in model.decoder._plans for rows, tokens in want)
        assert list(sched.cache.filled) == [0, 0, 0, 0] and sched.steps == 0
        out = []
        prompt = [3, 14, 15, 9, 2, 6]
        done = threading.Event()
        sched.submit([Job(prompt, 5, SamplingParams(temperature=0), index=0, ignore_eos=True,
                          sink=lambda e: (out.append(e), e.kind in ("done", "error") and done.set()))])
        assert done.wait(60)
        want_ids = reference.generate(prompt, max_new_tokens=5, temperature=0, eos_token_id=[]).token_ids
        assert [e.token_id for e in out if e.kind == "token"] == list(want_ids)
    finally:
        sched.shutdown()
