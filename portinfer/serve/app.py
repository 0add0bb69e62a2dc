"""The HTTP layer: FastAPI routes, thin over the engine loop (scheduler.py) that owns the model.

A route validates (protocol.py), tokenizes, submits one job per choice, and turns the jobs'
events into an OpenAI response or an SSE stream. A client that goes away cancels its jobs;
the engine frees their slots at the next step boundary.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.sampling import SamplingParams
from . import protocol
from .metrics import Metrics
from .protocol import APIError, bad_request
from .scheduler import Job, Scheduler

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/health", "/metrics")
DISCONNECT_POLL_S = 0.25


def create_app(model, served_model_name=None, api_key=None, max_batch=8, max_context=None, max_queue=None,
               prefill_chunk=256) -> FastAPI:
    name = served_model_name or model.name
    metrics = Metrics(name)
    is_encoder = bool(getattr(model, "is_encoder", False))
    scheduler = None if is_encoder else Scheduler(model, max_batch, max_context, max_queue, prefill_chunk, metrics)
    calls = _EngineCalls(scheduler)

    async def lifespan(app):
        if scheduler is not None:
            scheduler.start()
        else:
            calls.start()
        yield
        if scheduler is not None:
            scheduler.shutdown()
        calls.stop()

    app = FastAPI(title="portinfer", lifespan=lifespan)
    app.state.model, app.state.scheduler, app.state.metrics, app.state.served_model_name = \
        model, scheduler, metrics, name

    # ------------------------------------------------------------------ errors, once

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        err = protocol.validation_error(exc.errors())
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(err.body(), 500)

    def check_model(requested):
        if requested is not None and requested not in (name, model.name):
            raise APIError(404, f"The model `{requested}` does not exist (this server serves `{name}`).",
                           "invalid_request_error", "model", "model_not_found")

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if scheduler is not None and (scheduler._thread is None or not scheduler._thread.is_alive()):
            raise APIError(503, "the engine loop is not running", "server_error")
        # step plans the engine still builds while idle (Scheduler._warm_one): ready, but first requests
        # of those shape classes may wait for one build
        return {"status": "ok", "plans_to_build": len(scheduler.to_warm) if scheduler is not None else 0}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        ctx = scheduler.max_context if scheduler is not None else model.context_length
        return {"object": "list", "data": [{"id": name, "object": "model", "created": protocol.now(),
                                            "owned_by": "portinfer", "max_model_len": ctx}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: protocol.ChatCompletionRequest, raw: Request):
        check_model(req.model)
        _generator_only(model, is_encoder, name)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
        try:
            text = model.apply_chat_template(messages)
            ids = model.encode(text)
        except Exception as exc:  # noqa: BLE001 - a template or tokenizer error is this request's
            raise bad_request(f"messages: the chat template or tokenizer failed: {type(exc).__name__}: {exc}",
                              "messages") from exc
        return await _generate("chat", req, [ids], raw, scheduler, model, name)

    @app.post("/v1/completions")
    async def completions(req: protocol.CompletionRequest, raw: Request):
        check_model(req.model)
        _generator_only(model, is_encoder, name)
        prompts = []
        for i, p in enumerate(req.prompts()):
            if isinstance(p, str):
                try:
                    prompts.append(model.encode(p))
                except Exception as exc:  # noqa: BLE001
                    raise bad_request(f"prompt[{i}]: the tokenizer failed: {type(exc).__name__}: {exc}",
                                      "prompt") from exc
            else:
                prompts.append(list(p))
        return await _generate("text", req, prompts, raw, scheduler, model, name)

    @app.post("/v1/embeddings")
    async def embeddings(req: protocol.EmbeddingRequest):
        check_model(req.model)
        if not is_encoder:
            raise APIError(400, f"model `{name}` has no embedding output (it is a decoder: it generates text); "
                                f"serve an encoder model (BERT family) for /v1/embeddings", "invalid_request_error",
                           "model", "model_has_no_embeddings")
        inputs = req.input
        if isinstance(inputs, str) or (inputs and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        if not inputs or any(len(x) == 0 for x in inputs):
            raise bad_request("input: expected a non-empty string, token list, or a list of them", "input")
        try:
            vectors, info = await asyncio.wrap_future(calls.submit(lambda: model.embed(inputs, return_info=True)))
        except ValueError as exc:
            raise bad_request(f"input: {exc}", "input") from exc
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise bad_request(f"dimensions: this model's embeddings have {vectors.shape[1]} dimensions, got "
                              f"{req.dimensions}", "dimensions")
        rows = vectors.float().cpu()
        data = []
        for i, row in enumerate(rows):
            emb = base64.b64encode(row.numpy().tobytes()).decode() if req.encoding_format == "base64" \
                else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = int(sum(info.num_tokens))
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    return _Gate(app, api_key, metrics)


def _generator_only(model, is_encoder, name):
    if is_encoder:
        raise APIError(400, f"model `{name}` is an encoder: it has no text generation; use /v1/embeddings",
                       "invalid_request_error", "model", "model_has_no_generation")


# ---------------------------------------------------------------------- generation

def _jobs(kind, req, prompts, scheduler: Scheduler, model, sink) -> list[Job]:
    d = model.generation_defaults
    stops = req.stop_list()
    num_logprobs = req.num_logprobs()
    field = "messages" if kind == "chat" else "prompt"
    jobs = []
    for p_index, ids in enumerate(prompts):
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.config.vocab_size for t in ids):
            raise bad_request(f"prompt: token ids must be integers in [0, {model.config.vocab_size})", "prompt")
        requested = req.max_new_tokens()
        max_new = requested if requested is not None else scheduler.max_context - len(ids)
        if len(ids) + max(max_new, 1) > scheduler.max_context:
            raise bad_request(
                f"This model's maximum context length is {scheduler.max_context} tokens. However, you requested "
                f"{len(ids) + max(max_new, 1)} tokens ({len(ids)} in the {field}, {max(max_new, 1)} in the "
                f"completion). Please reduce the length of the {field} or completion.", field,
                "context_length_exceeded")
        for choice in range(req.n):
            seed = None if req.seed is None else req.seed + choice
            try:
                params = SamplingParams(
                    temperature=d.get("temperature", 1.0) if req.temperature is None else req.temperature,
                    top_k=d.get("top_k") if req.top_k is None else req.top_k,
                    top_p=d.get("top_p") if req.top_p is None else req.top_p,
                    min_p=d.get("min_p") if req.min_p is None else req.min_p, seed=seed)
            except ValueError as exc:
                raise bad_request(str(exc), str(exc).split(":")[0]) from exc
            rep = d.get("repetition_penalty", 1.0) if req.repetition_penalty is None else req.repetition_penalty
            jobs.append(Job(prompt=list(ids), max_new_tokens=max_new, sampling=params, sink=sink,
                            index=p_index * req.n + choice, stops=stops, repetition_penalty=rep,
                            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                            logprobs=num_logprobs, ignore_eos=bool(getattr(req, "ignore_eos", False))))
    return jobs


async def _generate(kind, req, prompts, raw: Request, scheduler: Scheduler, model, name):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(event):  # engine thread -> this request's event loop
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    jobs = _jobs(kind, req, prompts, scheduler, model, sink)
    scheduler.submit(jobs)
    prompt_tokens = sum(len(p) for p in prompts)
    rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = protocol.now()
    obj = "chat.completion" if kind == "chat" else "text_completion"

    def cancel_all():
        for job in jobs:
            if not job.done:
                job.cancel()
        scheduler.wake()

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(kind, jobs, events, rid, created, name, prompt_tokens, include_usage,
                                         cancel_all), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts = {j.index: [] for j in jobs}
    logprobs = {j.index: [] for j in jobs}
    finish, completion_tokens = {}, 0
    try:
        while len(finish) < len(jobs):
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await raw.is_disconnected():
                    return Response(status_code=499)
                continue
            if ev.kind == "error":
                raise ev.error
            if ev.kind == "token":
                texts[ev.index].append(ev.text)
                if ev.logprobs is not None:
                    logprobs[ev.index].append(ev.logprobs)
            else:
                finish[ev.index] = ev.finish_reason
                completion_tokens += ev.completion_tokens
    finally:
        cancel_all()
    choices = []
    for j in sorted(jobs, key=lambda j: j.index):
        text = "".join(texts[j.index])
        lp = None
        if j.logprobs is not None:
            lp = protocol.chat_logprobs(logprobs[j.index]) if kind == "chat" else \
                protocol.completion_logprobs(logprobs[j.index])
        if kind == "chat":
            choices.append({"index": j.index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": finish[j.index]})
        else:
            choices.append({"index": j.index, "text": text, "logprobs": lp, "finish_reason": finish[j.index]})
    return {"id": rid, "object": obj, "created": created, "model": name, "choices": choices,
            "usage": protocol.usage(prompt_tokens, completion_tokens)}


async def _stream(kind, jobs, events, rid, created, name, prompt_tokens, include_usage, cancel_all):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices, usage=None):
        body = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices}
        if usage is not None or include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    offsets = {j.index: 0 for j in jobs}
    done, completion_tokens = 0, 0
    try:
        if kind == "chat":
            for j in jobs:
                yield chunk([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        while done < len(jobs):
            ev = await events.get()
            if ev.kind == "error":
                yield f"data: {json.dumps(ev.error.body())}\n\n"
                break
            if ev.kind == "token":
                if not ev.text and ev.logprobs is None:
                    continue
                lp = None
                if ev.logprobs is not None:
                    lp = protocol.chat_logprobs([ev.logprobs]) if kind == "chat" else \
                        protocol.completion_logprobs([ev.logprobs], offsets[ev.index])
                offsets[ev.index] += len(ev.text)
                if kind == "chat":
                    yield chunk([{"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp,
                                  "finish_reason": None}])
                else:
                    yield chunk([{"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": None}])
                continue
            done += 1
            completion_tokens += ev.completion_tokens
            # every response carries usage: the last choice's final chunk has it (or, with
            # stream_options.include_usage, a chunk of its own, as OpenAI sends it)
            last = done == len(jobs) and not include_usage
            usage = protocol.usage(prompt_tokens, completion_tokens) if last else None
            if kind == "chat":
                yield chunk([{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}],
                            usage)
            else:
                yield chunk([{"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}],
                            usage)
        else:
            if include_usage:
                yield chunk([], protocol.usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all()


# ---------------------------------------------------------------------- the edge: key and counts

class _Gate:
    """ASGI wrapper: the API key on /v1/*, and requests counted by endpoint and status."""

    def __init__(self, app: FastAPI, api_key, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path.startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   "invalid_request_error", code="invalid_api_key")
                    return await JSONResponse(err.body(), 401)(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


class _EngineCalls:
    """For an encoder model (no generation loop): one thread owns the model and runs its calls."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._executor = None

    def start(self):
        import concurrent.futures

        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="portinfer-engine")

    def submit(self, fn):
        if self.scheduler is not None:
            return self.scheduler.call(fn)
        return self._executor.submit(fn)

    def stop(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------- running it

class Server:
    """uvicorn in a thread (tests, the load generator): `with Server(app) as url: ...`."""

    def __init__(self, app, host="127.0.0.1", port=0, graceful_s=5.0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self._thread.join(30)
