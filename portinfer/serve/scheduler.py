"""The engine loop: one thread owns the model; requests join and leave a running batch through slots.

    waiting (FIFO, bounded) --admit--> slot PREFILL --last chunk--> slot DECODE --finish/cancel--> FREE

One KV cache of `max_batch` rows x `max_context` positions is allocated once; slot s is cache
row s (llama.cpp's server slots). Each turn of the loop, at a step boundary:
  1. cancelled jobs leave (their slot is free for this very turn), waiting jobs take free slots
     (the lowest first, so running rows stay packed at the top of the cache);
  2. prefill steps read at most `prefill_chunk` prompt tokens in all: chunks of the new jobs'
     prompts, the oldest first. A step is a rectangle (model.step(ids[k, C], cache, n_new,
     rows=slice(a, a + k)); rows of other slots in the slice get n_new = 0 and are left as they
     are), so every row is computed at the longest chunk's length, and with step plans at its shape
     class (k a power of two, C one of 16, 24, 32, 40, 48, 56, 64, 80, ...). A burst of requests
     lands on consecutive slots, and one step reads the chunks of neighbouring slots when that
     computes no more token rows than a step each would (prompts of similar length); otherwise each
     chunk gets its own step. A long
     prompt is read over several turns, and running streams keep getting a token every turn;
  3. one decode step runs every decoding slot at once (model.step(ids[b, 1], cache, n_new=1 or 0
     per row, rows=slice(0, b))): the weights are read once per step for the whole batch.
A step that fails (NaN logits, say) is retried row by row, so only the failing job fails.

Jobs are single sequences; a request with n choices submits n jobs. Results go back through
each job's `sink(event)`, called on this thread (the HTTP layer hands them to its event loop).
"""
from __future__ import annotations

import collections
import concurrent.futures
import enum
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..runtime.detokenize import IncrementalDetokenizer
from ..runtime.model import all_finite
from ..runtime.sampling import Sampler, SamplingParams
from .protocol import APIError


class SlotState(enum.Enum):
    FREE = "free"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Event:
    """What a job reports: a token ("token"), its end ("done"), or its failure ("error")."""

    kind: str
    index: int
    text: str = ""
    token_id: int | None = None
    logprobs: tuple | None = None  # (token text, logprob, [(alternative text, logprob), ...])
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: APIError | None = None


@dataclass
class Job:
    """One sequence to generate (one choice of one request)."""

    prompt: list
    max_new_tokens: int
    sampling: SamplingParams  # temperature, top_k, top_p, min_p, seed (repetition penalty applied here)
    sink: object  # callable(Event), called on the engine thread
    index: int = 0
    stops: list = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and k alternatives
    ignore_eos: bool = False
    cancelled: bool = False
    # engine-side state
    submitted_s: float = 0.0
    slot: int | None = None
    prefilled: int = 0
    generated: list = field(default_factory=list)
    last_token_s: float | None = None
    done: bool = False

    def cancel(self):
        """Leave at the next step boundary (a client went away). Safe from any thread."""
        self.cancelled = True


class Scheduler:
    def __init__(self, model, max_batch=8, max_context=None, max_queue=None, prefill_chunk=256, metrics=None):
        self.model = model
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or min(model.context_length, 2048))
        if not 1 <= self.max_context <= model.context_length:
            raise ValueError(f"--max-context: expected 1..{model.context_length} (the model's context), "
                             f"got {self.max_context}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch: expected an integer >= 1, got {self.max_batch}")
        self.max_queue = int(max_queue if max_queue is not None else 4 * self.max_batch)
        self.prefill_chunk = int(prefill_chunk)
        self.metrics = metrics
        self.plans = bool(getattr(model, "plans", False))  # pad steps to a few shape classes (see _bucket)
        self.eos = set(model.eos_token_ids)
        self.cache = None
        self.slots: list[Job | None] = [None] * self.max_batch
        self.states = [SlotState.FREE] * self.max_batch
        self.waiting: collections.deque[Job] = collections.deque()
        self.calls: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = None
        self.steps = 0
        # shape classes whose step plans the loop builds while it has nothing else to do (_warm_one)
        self.to_warm = self._warm_classes()
        self.warmed = []  # (rows, tokens, seconds) of each class built so far

    # ------------------------------------------------------------------ other threads

    def start(self):
        self.cache = self.model.new_cache(self.max_batch, self.max_context)
        self._thread = threading.Thread(target=self._run, name="portinfer-engine", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]):
        """Queue all of a request's jobs, or none: a full queue answers 429 at once, never blocks."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down",
                               headers={"Retry-After": "5"})
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise APIError(429, f"the server is busy: {len(self.waiting)} sequences are waiting (queue limit "
                                    f"{self.max_queue}); retry later", "rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"})
            t = time.perf_counter()
            for job in jobs:
                job.submitted_s = t
                self.waiting.append(job)
            self._cond.notify()
        self._gauges()

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn() on the engine thread between steps (the model has one owner); a Future of its result."""
        future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            self.calls.append((fn, future))
            self._cond.notify()
        return future

    def wake(self):
        with self._cond:
            self._cond.notify()

    def shutdown(self, timeout_s=10.0):
        """Stop taking jobs; the loop fails whatever is still queued or running, then ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ facts (any thread)

    @property
    def running(self) -> int:
        return sum(s is not SlotState.FREE for s in self.states)

    def _gauges(self):
        if self.metrics is not None:
            self.metrics.set_state(running=self.running, waiting=len(self.waiting),
                                   slots_used=self.running, slots_total=self.max_batch)

    # ------------------------------------------------------------------ the loop

    def _run(self):
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._busy() and not self.to_warm:
                        self._cond.wait(0.5)
                    if self._stopping:
                        break
                    idle = not self._busy()
                if idle:
                    self._warm_one()
                    continue
                self._turn()
        finally:
            self._fail_all(APIError(503, "the server shut down before this request finished", "server_error",
                                    code="shutting_down"))
            self._gauges()

    def _busy(self) -> bool:
        return bool(self.waiting or self.calls or self.running)

    def _warm_classes(self) -> list:
        """(rows, tokens) of the steps a server runs most, whose plans are built while it is idle: a
        decode step of each batch class, and a prompt's prefill step alone at each length class that
        fits the chunk budget and the context (first use of a class otherwise traces and compiles it
        inside a request: SmolLM2 on cpu[int8-all], a first decode step of 8 rows 180 ms against 6 ms
        replayed). None without plans, or for a model split over ranks (every rank would have to
        follow the warm-up steps)."""
        shard = getattr(getattr(self.model, "decoder", None), "shard", None)
        if not self.plans or getattr(shard, "sharded", False):
            return []
        decode = sorted({_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        budget = min(self.prefill_chunk, self.max_context)
        lengths = sorted({_prefill_length(n) for n in range(1, budget + 1)})
        return [(rows, 1) for rows in decode] + [(1, n) for n in lengths if n <= self.max_context]

    def _warm_one(self):
        """Build the next class's plan with one step over free cache rows (every slot is free: the
        loop only warms while idle), then empty those rows again; never fails the server (a class
        that cannot be built is skipped)."""
        rows, tokens = self.to_warm.pop(0)
        t0 = time.perf_counter()
        try:
            self.model.step(torch.zeros(rows, tokens, dtype=torch.int64), self.cache, None, slice(0, rows))
        except Exception:  # noqa: BLE001 - a warm-up is an optimization: the request path reports errors
            pass
        finally:
            for s in range(rows):
                self.cache.reset(s)
        self.warmed.append((rows, tokens, time.perf_counter() - t0))

    def _turn(self):
        while self.calls:
            fn, future = self.calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
        self._admit()
        self._prefill()
        self._decode_step()
        self._gauges()

    def _admit(self):
        for s, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                self._free(s)
        with self._cond:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            for s in range(self.max_batch):
                if not self.waiting:
                    break
                if self.states[s] is SlotState.FREE:
                    job = self.waiting.popleft()
                    while job.cancelled and self.waiting:
                        job = self.waiting.popleft()
                    if job.cancelled:
                        break
                    self._place(s, job)

    def _place(self, s, job: Job):
        self.cache.reset(s)
        job.slot, job.prefilled = s, 0
        job.sampler = Sampler(job.sampling)
        job.detokenizer = IncrementalDetokenizer(self.model.tokenizer, job.stops) \
            if self.model.tokenizer is not None else None
        penalties = job.presence_penalty or job.frequency_penalty
        job.counts = np.zeros(self.model.config.vocab_size, dtype=np.float32) if penalties else None
        if job.repetition_penalty != 1.0:  # transformers' semantics: prompt and generated tokens
            job.seen = np.zeros(self.model.config.vocab_size, dtype=bool)
            job.seen[np.asarray(job.prompt, dtype=np.int64)] = True
        else:
            job.seen = None
        self.slots[s], self.states[s] = job, SlotState.PREFILL
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(job.prompt))

    def _free(self, s):
        job = self.slots[s]
        if job is not None:
            job.slot = None
        self.slots[s], self.states[s] = None, SlotState.FREE
        self.cache.reset(s)

    def _prefill(self):
        """This turn's prefill steps: chunks of the prefilling jobs' prompts, at most `prefill_chunk`
        prompt tokens in all (so a long prompt is read over several turns while the running streams
        get a token every turn). The oldest job first; each step reads one chunk, or chunks of the
        prefilling jobs in the slots next to it when a shared step computes no more token rows than
        separate steps would (`_rows_computed`: a step is a rectangle, every row padded to its longest)."""
        budget = self.prefill_chunk
        while budget > 0:
            pending = [s for s in range(self.max_batch) if self.states[s] is SlotState.PREFILL]
            if not pending:
                return
            oldest = min(pending, key=lambda i: self.slots[i].submitted_s)
            run, left = [(oldest, self._next_chunk(oldest, budget))], budget  # the run of neighbours, in order
            left -= len(run[0][1])
            for direction in (1, -1):  # consecutive prefilling slots, up then down, while the budget lasts
                s = oldest + direction
                while left > 0 and 0 <= s < self.max_batch and self.states[s] is SlotState.PREFILL:
                    run.append((s, self._next_chunk(s, left)))
                    left -= len(run[-1][1])
                    s += direction
            # the longest start of the run whose shared step computes no more rows than a step each
            k = max(k for k in range(1, len(run) + 1) if self._rows_computed(dict(run[:k])) <=
                    sum(self._rows_computed({slot: chunk}) for slot, chunk in run[:k]))
            chunks = dict(run[:k])
            budget -= sum(len(c) for c in chunks.values())
            self._prefill_step(chunks)

    def _shape(self, chunks: dict):
        """The step over the slots of `chunks` ({slot: tokens}): (first row, rows, tokens per row).
        With step plans, shape classes: rows rounded up to a power of two and tokens per row by
        `_prefill_length` (each class is traced once, then replayed)."""
        a, b = min(chunks), max(chunks) + 1
        longest = max(len(c) for c in chunks.values())
        if not self.plans:
            return a, b - a, longest
        width = _bucket(b - a, self.max_batch)
        return min(a, self.max_batch - width), width, _prefill_length(longest)

    def _rows_computed(self, chunks: dict) -> int:
        _, width, length = self._shape(chunks)
        return width * length

    def _prefill_step(self, chunks: dict):
        a, width, length = self._shape(chunks)
        b = a + width
        ids = torch.zeros(width, length, dtype=torch.int64)
        n_new = [0] * width
        for s, chunk in chunks.items():
            ids[s - a, :len(chunk)] = torch.tensor(chunk)
            n_new[s - a] = len(chunk)
        before = list(self.cache.filled)
        try:
            logits = self.model.step(ids, self.cache, n_new, slice(a, b))
        except Exception:  # noqa: BLE001 - find the failing rows: each one again, alone
            self.cache.filled[:] = before
            for s, chunk in sorted(chunks.items()):
                try:
                    row = self.model.step(ids[s - a:s - a + 1, :len(chunk)], self.cache, [len(chunk)],
                                          slice(s, s + 1))
                except Exception as exc:  # noqa: BLE001 - this job's failure, not the batch's
                    self._fail(s, exc)
                    continue
                self._prefilled(s, len(chunk), row[0])
            self.steps += 1
            return
        self.steps += 1
        for s, chunk in sorted(chunks.items()):
            self._prefilled(s, len(chunk), logits[s - a])

    def _next_chunk(self, s, budget) -> list:
        """At most `budget` (<= prefill_chunk) of slot s's prompt tokens not read yet."""
        job = self.slots[s]
        return job.prompt[job.prefilled:job.prefilled + budget]

    def _prefilled(self, s, count, logits):
        job = self.slots[s]
        job.prefilled += count
        if job.prefilled == len(job.prompt):
            self.states[s] = SlotState.DECODE
            self._accept(s, logits.float().cpu())

    def _decode_step(self):
        decoding = [s for s in range(self.max_batch) if self.states[s] is SlotState.DECODE]
        if not decoding:
            return
        width = decoding[-1] + 1  # rows 0..width-1 (slots are taken lowest first)
        if self.plans:
            width = _bucket(width, self.max_batch)
        ids = torch.zeros(width, 1, dtype=torch.int64)
        n_new = [0] * width
        for s in decoding:
            ids[s, 0] = self.slots[s].generated[-1]
            n_new[s] = 1
        before = list(self.cache.filled)
        try:
            logits = self.model.step(ids, self.cache, n_new, slice(0, width)).float().cpu()
        except Exception:  # noqa: BLE001 - find the failing rows: each one again, alone
            self.cache.filled[:] = before
            for s in decoding:
                try:
                    row = self.model.step(ids[s:s + 1], self.cache, None, slice(s, s + 1)).float().cpu()
                except Exception as exc:  # noqa: BLE001
                    self._fail(s, exc)
                    continue
                self._accept(s, row[0])
            self.steps += 1
            return
        self.steps += 1
        for s in decoding:
            self._accept(s, logits[s])

    # ------------------------------------------------------------------ one job's token

    def _accept(self, s, logits):
        """Sample the job's next token from its row of logits ([V], host) and report it."""
        job = self.slots[s]
        try:
            token, logprobs = self._sample(job, logits)
            job.generated.append(token)
            if job.counts is not None:
                job.counts[token] += 1
            if job.seen is not None:
                job.seen[token] = True
            finish = None
            piece = ""
            if token in self.eos and not job.ignore_eos:
                finish = "stop"
            elif job.detokenizer is not None:
                piece = job.detokenizer.add(token)
                if job.detokenizer.finished:
                    finish = "stop"
            if finish is None and (len(job.generated) >= job.max_new_tokens
                                   or len(job.prompt) + len(job.generated) >= self.max_context):
                finish = "length"
            if finish is not None and job.detokenizer is not None:
                piece += job.detokenizer.flush()  # "" after a stop string: the text was cut there
        except Exception as exc:  # noqa: BLE001 - a tokenizer or sampling failure fails this job alone
            self._fail(s, exc)
            return
        now = time.perf_counter()
        if self.metrics is not None:
            if job.last_token_s is None:
                self.metrics.time_to_first_token.observe(now - job.submitted_s)
            else:
                self.metrics.inter_token_latency.observe(now - job.last_token_s)
            self.metrics.generation_tokens.inc()
        job.last_token_s = now
        job.sink(Event("token", job.index, piece, token, logprobs))
        if finish is not None:
            job.done = True
            job.sink(Event("done", job.index, finish_reason=finish, prompt_tokens=len(job.prompt),
                           completion_tokens=len(job.generated)))
            self._free(s)

    def _sample(self, job: Job, logits):
        """The job's next token (and its logprobs) from its row of logits, in numpy on this thread:
        torch ops over the vocabulary would run on torch's OpenMP threads, which keep spinning into
        the next native step (runtime/sampling.py, docs/step-plans.md)."""
        if not all_finite(logits):
            raise FloatingPointError("the model produced non-finite logits for this sequence")
        row = x = logits.detach().numpy()
        if job.seen is not None:
            p = np.float32(job.repetition_penalty)
            x = np.where(job.seen & (x > 0), x / p, np.where(job.seen, x * p, x))
        if job.counts is not None:  # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence
            x = x - (job.counts * np.float32(job.frequency_penalty) +
                     (job.counts > 0).astype(np.float32) * np.float32(job.presence_penalty))
        token = job.sampler(x[None], None)[0]
        logprobs = None
        if job.logprobs is not None:  # the model's own distribution, before penalties
            z = row.astype(np.float64)
            z -= z.max()
            lp = z - np.log(np.exp(z).sum())
            alts = []
            if job.logprobs:
                k = min(job.logprobs, lp.shape[0])
                top = np.argpartition(-lp, k - 1)[:k]
                top = top[np.argsort(-lp[top], kind="stable")]
                alts = [(self._token_text(int(i)), float(lp[i])) for i in top]
            logprobs = (self._token_text(token), float(lp[token]), alts)
        return token, logprobs

    def _token_text(self, token_id) -> str:
        tok = self.model.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else f"<{token_id}>"

    def _fail(self, s, exc):
        job = self.slots[s]
        self._free(s)
        message = f"generation failed for this request: {type(exc).__name__}: {exc}"
        job.done = True
        job.sink(Event("error", job.index, error=APIError(500, message, "server_error", code="generation_failed")))

    def _fail_all(self, error: APIError):
        with self._cond:
            jobs = list(self.waiting)
            self.waiting.clear()
            calls = list(self.calls)
            self.calls.clear()
        for s in range(self.max_batch):
            if self.slots[s] is not None:
                jobs.append(self.slots[s])
                self._free(s)
        for job in jobs:
            if not job.done:
                job.done = True
                job.sink(Event("error", job.index, error=error))
        for _, future in calls:
            future.cancel()


def _prefill_length(n: int) -> int:
    """A prefill step's n tokens per row rounded up to a shape class (with step plans): 16, 24, 32,
    then four classes per doubling (40, 48, 56, 64, 80, 96, ...), so padding is at most a quarter of
    a row (n = 65 -> 80) and ~6% on average, and a 256-token chunk budget has 16 length classes."""
    if n <= 16:
        return 16
    step = max(8, 1 << ((n - 1).bit_length() - 3))
    return -(-n // step) * step


def _bucket(n: int, cap: int) -> int:
    """n rounded up to a power of two (at most cap): with step plans, a few shape classes serve every
    number of rows, of a decode step or a prefill step (each class is traced once, then replayed; a
    prefill step's tokens per row take `_prefill_length`)."""
    return min(cap, 1 << (n - 1).bit_length())
