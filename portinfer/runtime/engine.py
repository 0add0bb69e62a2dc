"""The engine: `portinfer.load(...)` -> Model, with logits, prefill/decode steps and generation.

generate() tokenizes, checks every input before any kernel runs, allocates one KV cache for
the whole batch (prompts of different lengths are right-padded; see model.py), prefills once,
then decodes one token per sequence per step until each stops: on an eos id, a stop string,
max_new_tokens, or the context's end. `stream=True` returns an iterator of text pieces.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ..backends import registry, spec
from ..backends.placement import Placement
from .config import token_ids
from .detokenize import IncrementalDetokenizer
from .loader import Checkpoint, default_model_path, load_checkpoint
from .model import Decoder
from .sampling import Sampler, SamplingParams

MODEL_OPS = ("embedding", "linear", "rms_norm", "rope", "silu_mul", "attention")


@dataclass
class Generation:
    """One prompt's result."""

    text: str
    token_ids: list  # generated ids (stop string excluded from text, ids kept as generated)
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # the whole batch's work in those times (a batch is prefilled and decoded together)
    prefill_tokens: int = 0
    decode_tokens: int = 0

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode steps (every token after each sequence's first)."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else float("nan")

    def as_dict(self):
        """JSON-ready: a rate that was not measured (no decode step) is None, not NaN."""
        def rate(value):
            return value if math.isfinite(value) else None

        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "finish_reason": self.finish_reason, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tok_s": rate(self.prefill_tok_s), "decode_tok_s": rate(self.decode_tok_s)}


class Stream:
    """Iterator of text pieces as tokens come; `.result` holds the Generation once exhausted."""

    def __init__(self, pieces):
        self._pieces = pieces
        self.result: Generation | None = None
        self._iterator = self._run()  # one pass: iterating again resumes it (or yields nothing), never restarts

    def _run(self):
        self.result = yield from self._pieces

    def __iter__(self):
        return self._iterator


@dataclass
class _Sequence:
    prompt: list
    generated: list = field(default_factory=list)
    finish_reason: str = ""
    detokenizer: IncrementalDetokenizer | None = None  # made at the first token (see _advance)

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""


class Model:
    def __init__(self, checkpoint: Checkpoint, placement: Placement, plans: bool = True, decoder=None):
        self.plans = bool(plans)  # steps through step plans (see graph.py), or every op on the op path
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.name = checkpoint.name
        self.file_bytes = checkpoint.file_bytes
        self.source_format = checkpoint.source_format
        self.generation_defaults = dict(checkpoint.generation_defaults)
        self._placement = placement
        self.num_parameters = sum(math.prod(w.shape) for w in checkpoint.weights.values())
        self.decoder = decoder or Decoder(checkpoint.config, checkpoint.weights, placement)
        eos = list(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token is not None:
            tid = self.tokenizer.token_id(self.tokenizer.eos_token)
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_token_ids = eos

    # ------------------------------------------------------------------ facts

    @property
    def backend(self) -> str:
        return self._placement.primary.name

    @property
    def device(self) -> torch.device:
        return self._placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self._placement.dtype

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def placement(self):
        """Per op: where it ran, how often, why it fell back, and the bytes copied between devices."""
        return self._placement.report()

    def __repr__(self):
        return (f"<portinfer.Model {self.name!r} {self.config.architecture} on {self.backend} "
                f"({self.device}, {spec.dtype_name(self.dtype)})>")

    # ------------------------------------------------------------------ forward passes

    def _check_ids(self, ids: torch.Tensor, what="input_ids"):
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise ValueError(f"{what}: expected an int64 tensor, got "
                             f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.numel() == 0:
            raise ValueError(f"{what}: expected at least one token, got an empty tensor")
        if ids.device.type == "cpu" and not ids.requires_grad:  # numpy's min / max: no torch op per step
            a = ids.numpy()
            lo, hi = int(a.min()), int(a.max())
        else:
            lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{what}: token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full forward without a cache: int64 [B, S] -> fp32 logits [B, S, V]."""
        self._check_ids(input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, S], got {list(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.context_length:
            raise ValueError(f"input_ids: {S} tokens exceed the model's context of {self.context_length}")
        return self.decoder.forward(input_ids, [S] * B, None, all_rows=True, plans=self.plans)

    def new_cache(self, batch_size: int, max_len: int):
        """A KV cache of `batch_size` rows of `max_len` positions, allocated once, in the dtype load's
        kv_cache_dtype chose (default: the activations'); cache.filled[b] says how many positions row b
        holds, cache.reset(b) empties a row."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if not 1 <= max_len <= self.context_length:
            raise ValueError(f"max_len: expected 1..{self.context_length} (the context), got {max_len}")
        return self.decoder.new_cache(batch_size, max_len)

    def step(self, input_ids: torch.Tensor, cache, n_new=None, rows=None) -> torch.Tensor:
        """One step over rows of a KV cache: int64 [b, S] (right-padded) -> fp32 logits [b, V] at
        each row's last new token. rows: None (every cache row; b = cache.batch_size) or a slice of
        contiguous rows (b = its length); n_new: new tokens per row (default S; 0 = the row idles:
        nothing is written and its logits mean nothing). Writes the cache and advances cache.filled."""
        self._check_ids(input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [b, S], got {list(input_ids.shape)}")
        B, S = input_ids.shape
        if rows is None:
            rows = slice(0, cache.batch_size)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows: expected a slice of contiguous cache rows (or None), got {rows!r}")
        start, stop, _ = rows.indices(cache.batch_size)
        if stop - start != B:
            raise ValueError(f"input_ids: {B} rows, but rows={rows!r} selects {max(0, stop - start)} of the "
                             f"cache's {cache.batch_size}")
        n_new = [S] * B if n_new is None else [int(n) for n in n_new]
        # a row of 0 new tokens idles (a finished sequence in a batch still decoding, a free slot)
        if len(n_new) != B or any(not 0 <= n <= S for n in n_new) or not any(n_new):
            raise ValueError(f"n_new: expected {B} values in 0..{S}, not all 0, got {n_new}")
        full = [f + n for f, n in zip(cache.filled[start:stop], n_new)]
        if max(full) > cache.max_len:
            raise ValueError(f"cache: {max(full)} positions needed, the cache holds {cache.max_len}")
        return self.decoder.forward(input_ids, n_new, cache, rows=slice(start, stop), plans=self.plans)

    def prefill(self, input_ids: torch.Tensor, cache, n_new=None) -> torch.Tensor:
        """Feed int64 [B, S] (right-padded; `n_new` tokens per row, default S) after what `cache`
        holds -> fp32 logits [B, V] at each row's last new token (a step over every row)."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, S], got {list(input_ids.shape)} "
                             f"(one prompt is input_ids[None])")
        return self.step(input_ids, cache, n_new)

    def decode(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        """One new token per row: int64 [B] -> fp32 logits [B, V]."""
        return self.step(token_ids.reshape(-1, 1), cache)

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer (no tokenizer.json / GGUF vocabulary): "
                             "pass token ids instead of text")
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages, add_generation_prompt=True, **template_kwargs) -> str:
        """The chat template rendered as transformers renders it; template_kwargs become template variables
        (Qwen3: enable_thinking=False renders an empty think block)."""
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, **template_kwargs)

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_or_ids, max_new_tokens=64, temperature=None, top_k=None, top_p=None, min_p=None,
                 repetition_penalty=None, seed=None, stop=None, stream=False, eos_token_id=None):
        """Generate from a prompt (str or token ids) or a batch of them (a list of str / of id lists).

        Returns a Generation (a list of them for a batch), or a Stream of text pieces with stream=True
        (one prompt only). Sampling defaults come from generation_config.json; temperature 0 is greedy.
        """
        batch = _is_batch(prompt_or_ids)
        prompts = list(prompt_or_ids) if batch else [prompt_or_ids]
        if not prompts:
            raise ValueError("prompt_or_ids: expected at least one prompt, got an empty list")
        if stream and len(prompts) != 1:
            raise ValueError(f"stream: expected a single prompt, got a batch of {len(prompts)}")
        ids = [self._prompt_ids(p, i if batch else None) for i, p in enumerate(prompts)]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        d = self.generation_defaults
        params = SamplingParams(
            temperature=d.get("temperature", 0.0) if temperature is None else temperature,
            top_k=d.get("top_k") if top_k is None else top_k, top_p=d.get("top_p") if top_p is None else top_p,
            min_p=d.get("min_p") if min_p is None else min_p,
            repetition_penalty=d.get("repetition_penalty", 1.0) if repetition_penalty is None else repetition_penalty,
            seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop: expected a non-empty string or a list of them, got {stop!r}")
        # True is an int in Python: token_ids refuses bools, so eos_token_id=True is an error, not token 1
        eos = self.eos_token_ids if eos_token_id is None else token_ids(eos_token_id, "eos_token_id")
        steps = _Steps(_loop(self, ids, max_new_tokens, Sampler(params), stops, set(eos)))
        if stream:
            return Stream(_stream_pieces(steps))
        for _ in steps:
            pass
        results = steps.results
        return results if batch else results[0]

    def _prompt_ids(self, prompt, index):
        where = "prompt" if index is None else f"prompt_or_ids[{index}]"
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{where}: expected a non-empty prompt, got an empty string")
            ids = self.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError(f"{where}: expected at least one token, got none")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: expected token ids (int), got {[type(t).__name__ for t in ids][:3]}")
        self._check_ids(torch.tensor(ids, dtype=torch.int64), where)
        if len(ids) >= self.context_length:
            raise ValueError(f"{where}: {len(ids)} tokens do not fit the model's context of {self.context_length} "
                             f"(at least one position must remain for a new token)")
        return ids

    # ------------------------------------------------------------------ encoders (issue 15: runtime/encoder.py)
    # A decoder answers these; encoder.EncoderModel (what load() returns for BERT-family directories)
    # overrides them and refuses the decoder methods above.
    is_encoder = False

    @property
    def embedding_dim(self):
        """Width of embed()'s vectors; None for a decoder (it has no embed)."""
        return None

    def embed(self, inputs, batch_size=32, normalize=None, truncate=True, return_info=False, progress=None):
        raise ValueError(f"embed: {self.name!r} is a decoder ({self.config.architecture}): embeddings come from "
                         f"encoder models (BERT, RoBERTa, XLM-RoBERTa: all-MiniLM, bge, e5), e.g. "
                         f"`portinfer embed` without a model uses all-MiniLM-L6-v2")


def _is_batch(p) -> bool:
    if isinstance(p, torch.Tensor):
        return p.dim() == 2
    return isinstance(p, (list, tuple)) and len(p) > 0 and not isinstance(p[0], int)


class _Steps:
    """The generation loop as a generator of (sequence index, new text) events; `.results` at the end."""

    def __init__(self, gen):
        self._gen = gen
        self.results = None

    def __iter__(self):
        self.results = yield from self._gen
        return self.results


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop(model: Model, prompts, max_new_tokens, sampler, stops, eos):
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    max_len = min(model.context_length, longest + max_new_tokens)
    cache = model.new_cache(B, max_len)
    seqs = [_Sequence(p) for p in prompts]
    ids = torch.zeros(B, longest, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)

    t0 = time.perf_counter()
    logits = model.step(ids, cache, [len(p) for p in prompts])
    _sync(model.device)
    prefill_s = time.perf_counter() - t0
    t_decode = None
    while True:
        seen = [s.prompt + s.generated for s in seqs] if sampler.params.repetition_penalty != 1.0 else None
        nxt = sampler(logits, seen)
        live = []
        for b, s in enumerate(seqs):
            if s.finish_reason:
                continue
            s.generated.append(nxt[b])
            piece = _advance(model, s, nxt[b], stops, eos)
            if not s.finish_reason and (len(s.generated) >= max_new_tokens
                                        or len(s.prompt) + len(s.generated) >= max_len):  # or the context is full
                s.finish_reason = "length"
            if s.finish_reason in ("eos", "length"):
                piece += _flush(model, s)
            if piece:
                yield b, piece
            if not s.finish_reason:
                live.append(b)
        if not live:
            break
        if t_decode is None:
            t_decode = time.perf_counter()
        # a finished sequence stays in the batch idle (0 new tokens): no cache write, its logits ignored
        last = torch.tensor([s.generated[-1] for s in seqs], dtype=torch.int64)
        logits = model.step(last[:, None], cache, [1 if b in live else 0 for b in range(B)])
    _sync(model.device)
    decode_s = time.perf_counter() - t_decode if t_decode is not None else 0.0
    prefill_tokens = sum(len(p) for p in prompts)
    decode_tokens = sum(len(s.generated) - 1 for s in seqs)
    return [Generation(s.text, s.generated, len(s.prompt), s.finish_reason, prefill_s, decode_s, prefill_tokens,
                       decode_tokens) for s in seqs]


def _advance(model, s: _Sequence, token, stops, eos) -> str:
    """Account for a new token: finish on eos or a stop string; return the text that became final
    (incremental: the work per token does not grow with the text, see detokenize.py)."""
    if token in eos:
        s.finish_reason = "eos"
        return ""
    if model.tokenizer is None:
        return ""
    if s.detokenizer is None:
        s.detokenizer = IncrementalDetokenizer(model.tokenizer, stops)
    piece = s.detokenizer.add(token)
    if s.detokenizer.finished:
        s.finish_reason = "stop"
    return piece


def _flush(model, s: _Sequence) -> str:
    """The text held back so far, now final (the sequence ended without a stop string)."""
    return s.detokenizer.flush() if s.detokenizer is not None else ""


def _stream_pieces(steps):
    for _, piece in steps:
        yield piece
    return steps.results[0]


def default_dtype(backend) -> torch.dtype:
    """fp32 on CPUs (exact, and the fastest there without bf16 units); bf16 on accelerators;
    a backend may declare `preferred_dtype` (an NPU without fp32 units, say)."""
    preferred = getattr(backend, "preferred_dtype", None)
    if preferred is not None:
        return preferred
    return torch.float32 if backend.device.type == "cpu" else torch.bfloat16


def load(path=None, backend="auto", dtype=None, fallback="warn", device=None, plans=True,
         tensor_parallel=None, kv_cache_dtype=None) -> Model:
    """Load a model: a Hugging Face directory or a .gguf file (None: the embedded default,
    SmolLM2-135M-Instruct Q4_1) on `backend` ("auto": the best available here). plans=False runs
    every step on the op path (each op validated and placed per call; see runtime/graph.py).

    tensor_parallel=N: this process is one of N ranks (torchrun --nproc-per-node N, or
    `portinfer generate --tensor-parallel N`) and loads only its shard (see runtime/parallel.py).
    Rank 0 returns the Model; on the other ranks this call serves rank 0's steps and then exits
    the process (status 0) when rank 0 is done.

    kv_cache_dtype: the KV cache's dtype ('fp32' / 'fp16' / 'bf16'; default: the activations'). Keys
    and values are rounded to it when written and read back converted, so a 16-bit cache halves its
    memory and what attention reads per step, at the cost of that rounding (docs/kv-cache.md)."""
    if kv_cache_dtype is not None:
        try:
            kv_cache_dtype = spec.parse_dtype(kv_cache_dtype)
        except ValueError:
            raise ValueError(f"kv_cache_dtype: expected one of fp32, fp16, bf16, got {kv_cache_dtype!r}") from None
        if tensor_parallel is not None:
            raise ValueError("kv_cache_dtype: not supported with tensor_parallel yet (each rank's cache takes "
                             "the activations' dtype)")
    if tensor_parallel is not None:
        return _load_parallel(default_model_path() if path is None else path, backend, dtype, fallback, device,
                              plans, tensor_parallel)
    checkpoint = load_checkpoint(default_model_path() if path is None else path)
    chosen = registry.get(backend, device=device)
    dtype = default_dtype(chosen) if dtype is None else spec.parse_dtype(dtype)
    if getattr(checkpoint.config, "is_encoder", False):  # BERT-family encoders (issue 15): runtime/encoder.py
        from .encoder import load_encoder

        return load_encoder(checkpoint, chosen, dtype, fallback, path, plans)
    placement = Placement(chosen, dtype, fallback)
    placement.require(MODEL_OPS)
    model = Model(checkpoint, placement, plans=plans)
    if kv_cache_dtype is not None:
        model.decoder.kv_dtype = kv_cache_dtype
    return model


def _load_parallel(path, backend, dtype, fallback, device, plans, world_size) -> Model:
    import atexit

    from . import parallel

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor_parallel: expected an integer >= 1, got {world_size!r}")
    parallel.check_split(path, world_size)  # a model N ranks cannot split is refused before any rank waits
    parallel.share_cpu_threads()
    chosen = registry.get(backend, device=device)
    if device is None and chosen.device.type != "cpu":  # one accelerator per rank: the local rank's
        chosen = registry.get(backend, device=parallel.default_device(chosen.device.type))
    group = parallel.Group(world_size, chosen.device)
    parallel.check_same_model(group, path)
    checkpoint, shard = parallel.load_sharded_checkpoint(
        path, lambda config: parallel.ShardSpec.for_rank(config, group.rank, group.world_size),
        with_tokenizer=group.is_leader)
    dtype = default_dtype(chosen) if dtype is None else spec.parse_dtype(dtype)
    placement = Placement(chosen, dtype, fallback)
    placement.require(MODEL_OPS)
    decoder = Decoder(checkpoint.config, checkpoint.weights, placement, shard, group)
    # only rank 0 builds a Model (num_parameters: this rank's shard)
    model = Model(checkpoint, placement, plans, parallel.LeaderDecoder(decoder, group)) if group.is_leader else None
    checkpoint.weights.clear()  # the backends' prepared copies are what the decoder keeps
    parallel.release_freed_memory()
    if not group.is_leader:
        parallel.follow(decoder, group)
        group.close()
        # leave without the interpreter's teardown: a C++ thread (the collective library's or the cpu
        # pool's) still joinable while static destructors run aborted a follower once in CI
        # ("terminate called without an active exception", SIGABRT after its work was done)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def stop():
        model.decoder.stop()
        group.close()

    atexit.register(stop)
    model.tensor_parallel = group.world_size
    return model
