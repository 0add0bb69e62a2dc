"""`portinfer serve` on the real embedded SmolLM2 (the session's torch-backend instance): concurrent
greedy chat requests each answer what the library's generate answers for that request alone."""
import asyncio

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the server tests talk through the official openai client")

from portinfer.serve.app import Server, create_app  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "What is 2 + 2? Answer with one number and explain briefly why that is the case."]


def test_concurrent_chat_equals_each_request_alone(smollm2_torch):
    model = smollm2_torch
    # the references first: once the server runs, its engine thread owns the model
    alone = []
    for q in QUESTIONS:
        g = model.generate(model.apply_chat_template([{"role": "user", "content": q}]), max_new_tokens=10,
                           temperature=0)
        alone.append((g.text, "length" if g.finish_reason == "length" else "stop", len(g.token_ids)))
    with Server(create_app(model, max_batch=4, max_context=256, prefill_chunk=32)) as url:
        async def together():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

            async def ask(i, q):
                kw = dict(model=model.name, messages=[{"role": "user", "content": q}], max_tokens=10, temperature=0)
                if i % 2:
                    chunks = [c async for c in await client.chat.completions.create(
                        stream=True, stream_options={"include_usage": True}, **kw)]
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                    return text, finish, chunks[-1].usage.completion_tokens
                r = await client.chat.completions.create(**kw)
                return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

            return await asyncio.gather(*(ask(i, q) for i, q in enumerate(QUESTIONS)))

        got = asyncio.run(together())
    assert got == alone
    assert "Paris" in got[0][0]
