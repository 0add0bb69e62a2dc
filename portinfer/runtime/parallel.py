"""Tensor parallelism over torch.distributed: one model split Megatron-style across N ranks.

    torchrun --nproc-per-node 2 script.py         # script: model = portinfer.load(path, tensor_parallel=2)
    portinfer generate MODEL --tensor-parallel 2  # launches the ranks itself (`launch` below)

What each rank holds (ShardSpec): its heads of q/k/v and its columns of gate/up (split by
rows of those weights), the matching columns of o_proj and down_proj (split by columns, so
each rank's product is a partial sum: one all-reduce after each), and a contiguous range of
the vocabulary of the embedding and lm_head (the embedding's partial rows are all-reduced, the
logits all-gathered). With fewer kv heads than ranks, each kv head is replicated on the ranks
whose q heads use it. Norm weights are replicated. A row-parallel bias (o_proj / down_proj) is
added by rank 0 only, so the all-reduce adds it once.

Each rank reads only its shards from the file: safetensors through `get_slice` (offsets, not
the whole tensor); GGUF by whole blocks (a column split must fall on a block boundary, or the
error says why). A checksum of the files, compared across ranks at load, catches ranks given
different models.

Only rank 0 tokenizes, samples and answers: it is the leader. Every decoder call it makes
(new cache, step) is first broadcast to the other ranks (the followers) with its token ids,
so all ranks step in lockstep; sampled tokens reach the followers as the next step's ids.
`load` on a follower serves the leader's steps and exits the process when the leader stops.

Process groups: the compute group uses the collective library of the backend's device (gloo
on CPU, NCCL on CUDA, HCCL on Ascend with torch_npu) with a timeout
(PORTINFER_TP_TIMEOUT_S, default 60 s), so a rank that dies or hangs mid-step makes the
others fail with an error naming it instead of hanging. Commands travel on a separate gloo
group without a short timeout: a follower may wait as long as the leader is idle.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig

TIMEOUT_ENV = "PORTINFER_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
# the collective library torch.distributed uses for each device type
COLLECTIVE_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class ParallelError(RuntimeError):
    """Tensor parallelism cannot start or cannot go on (the message names the input or the rank)."""


# ---------------------------------------------------------------------------- shard spec

@dataclass(frozen=True)
class ShardSpec:
    """Which part of each weight rank `rank` of `world_size` holds (global indices, local counts)."""

    rank: int
    world_size: int
    num_heads: int  # local q heads: heads [head_start, head_start + num_heads)
    head_start: int
    num_kv_heads: int  # local kv heads: [kv_head_start, kv_head_start + num_kv_heads)
    kv_head_start: int
    intermediate_size: int  # local MLP columns: [intermediate_start, + intermediate_size)
    intermediate_start: int
    vocab_start: int  # local vocabulary rows [vocab_start, vocab_stop)
    vocab_stop: int
    vocab_chunk: int  # rows per rank before the last one (logits are gathered padded to this)
    vocab_size: int  # the whole vocabulary
    head_dim: int

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def local_vocab(self) -> int:
        return self.vocab_stop - self.vocab_start

    @property
    def adds_row_bias(self) -> bool:
        """o_proj / down_proj biases: added by one rank, so the all-reduce counts them once."""
        return self.rank == 0

    def rows(self, part: str) -> tuple:
        """[start, stop) of the rows this rank holds of a weight split by `part`."""
        D = self.head_dim
        if part == "q":
            return self.head_start * D, (self.head_start + self.num_heads) * D
        if part == "kv":
            return self.kv_head_start * D, (self.kv_head_start + self.num_kv_heads) * D
        if part == "mlp":
            return self.intermediate_start, self.intermediate_start + self.intermediate_size
        if part == "vocab":
            return self.vocab_start, self.vocab_stop
        raise ValueError(f"part: expected q, kv, mlp or vocab, got {part!r}")

    @classmethod
    def single(cls, config: ModelConfig) -> "ShardSpec":
        return cls.for_rank(config, 0, 1)

    @classmethod
    def for_rank(cls, config: ModelConfig, rank: int, world_size: int) -> "ShardSpec":
        c, N = config, world_size
        problems = _split_problems(c, N)
        if problems:
            good = [n for n in range(1, c.num_heads + 1) if not _split_problems(c, n)]
            raise ParallelError(f"tensor_parallel={N}: {'; '.join(problems)}; it splits over "
                                f"{', '.join(map(str, good))} ranks: choose one of those")
        heads = c.num_heads // N
        if c.num_kv_heads >= N:
            kv_heads, kv_start = c.num_kv_heads // N, rank * (c.num_kv_heads // N)
        else:  # fewer kv heads than ranks: each rank holds the one kv head its q heads use
            kv_heads, kv_start = 1, rank // (N // c.num_kv_heads)
        inter = c.intermediate_size // N
        chunk = -(-c.vocab_size // N)
        v0, v1 = min(rank * chunk, c.vocab_size), min((rank + 1) * chunk, c.vocab_size)
        return cls(rank, N, heads, rank * heads, kv_heads, kv_start, inter, rank * inter, v0, v1, chunk,
                   c.vocab_size, c.head_dim)


def _split_problems(c: ModelConfig, N: int) -> list:
    if N < 1:
        return [f"expected at least 1 rank, got {N}"]
    problems = []
    if c.num_heads % N:
        problems.append(f"the model's {c.num_heads} attention heads do not divide evenly over {N} ranks")
    elif c.num_kv_heads >= N and c.num_kv_heads % N:
        problems.append(f"its {c.num_kv_heads} kv heads do not divide evenly over {N} ranks")
    elif c.num_kv_heads < N and N % c.num_kv_heads:
        problems.append(f"its {c.num_kv_heads} kv heads cannot be replicated evenly over {N} ranks "
                        f"(N must be a multiple of {c.num_kv_heads})")
    if c.intermediate_size % N:
        problems.append(f"its MLP width {c.intermediate_size} does not divide evenly over {N} ranks")
    if c.vocab_size < N:
        problems.append(f"its vocabulary of {c.vocab_size} is smaller than {N}")
    return problems


# ---------------------------------------------------------------------------- which part of which weight

# suffix of a Hugging Face name -> (split, part): rows of q/k/v and gate/up, columns of o/down,
# rows (vocabulary) of the embedding and lm_head; anything else is replicated
_SPLITS = (
    ("self_attn.q_proj.weight", "rows", "q"), ("self_attn.q_proj.bias", "rows", "q"),
    ("self_attn.k_proj.weight", "rows", "kv"), ("self_attn.k_proj.bias", "rows", "kv"),
    ("self_attn.v_proj.weight", "rows", "kv"), ("self_attn.v_proj.bias", "rows", "kv"),
    ("self_attn.o_proj.weight", "cols", "q"),
    ("mlp.gate_proj.weight", "rows", "mlp"), ("mlp.gate_proj.bias", "rows", "mlp"),
    ("mlp.up_proj.weight", "rows", "mlp"), ("mlp.up_proj.bias", "rows", "mlp"),
    ("mlp.down_proj.weight", "cols", "mlp"),
    ("model.embed_tokens.weight", "rows", "vocab"), ("lm_head.weight", "rows", "vocab"),
)


def split_of(name: str):
    """(split, part) for a weight name, or None when every rank holds it whole."""
    for suffix, split, part in _SPLITS:
        if name.endswith(suffix):
            return split, part
    return None


# ---------------------------------------------------------------------------- sharded loading

def load_sharded_checkpoint(path, shard_for, with_tokenizer=True):
    """Like loader.load_checkpoint, but each weight is read only as far as this rank's shard:
    shard_for(config) -> ShardSpec is called once the config is known, before any weight is read."""
    from . import loader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected a Hugging Face model directory "
                                f"or a .gguf file)")
    if path.is_dir():
        return _load_hf_dir_sharded(path, shard_for, with_tokenizer)
    if path.suffix.lower() == ".gguf":
        return _load_gguf_sharded(path, shard_for, with_tokenizer)
    raise loader.CheckpointError(f"model path {str(path)!r}: expected a Hugging Face model directory or a .gguf file")


def _hf_files(path: Path) -> list:
    from .loader import CheckpointError, _read_json

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set((_read_json(index).get("weight_map") or {}).values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for name in files:
        if not (path / name).exists():
            raise CheckpointError(f"{path}: shard {name} named in the index is missing")
    return [path / name for name in files]


def _load_hf_dir_sharded(path: Path, shard_for, with_tokenizer):
    from safetensors import SafetensorError, safe_open

    from .loader import Checkpoint, CheckpointError, _generation_defaults, _read_json
    from .tokenizer import Tokenizer

    generation = _read_json(path / "generation_config.json", required=False) or {}
    config = ModelConfig.from_hf(_read_json(path / "config.json"), generation)
    shard = shard_for(config)
    weights, total = {}, 0
    for file in _hf_files(path):
        total += file.stat().st_size
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    weights[name] = _slice_safetensors(f.get_slice(name), name, shard)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors (truncated or corrupt?): {exc}") from None
    tokenizer = Tokenizer.from_hf_dir(path) if with_tokenizer and (path / "tokenizer.json").exists() else None
    return Checkpoint(config, weights, tokenizer, _generation_defaults(generation), name=path.name,
                      file_bytes=total, source_format="safetensors"), shard


def _slice_safetensors(view, name, shard: ShardSpec):
    """Read one tensor's shard through safetensors' slice view (only those bytes are copied). A
    whole tensor comes back as a view of the mapped file: it is cloned, or that one view would
    keep the whole file mapped (and every page this rank read resident)."""
    how = split_of(name) if shard.sharded else None
    shape = view.get_shape()
    if how is None or not shape or (how[0] == "cols" and len(shape) != 2):
        return view[:].clone()
    split, part = how
    start, stop = shard.rows(part)
    return view[start:stop] if split == "rows" else view[:, start:stop]


def _load_gguf_sharded(path: Path, shard_for, with_tokenizer):
    from . import loader
    from .gguf_file import GGUFFile, TensorInfo
    from .tokenizer import Tokenizer

    try:
        f = GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise loader.CheckpointError(f"{path}: cannot read GGUF (truncated or corrupt?): {exc}") from None
    tensors = {t.name: t for t in f.tensors}
    freq_factors = None
    if "rope_freqs.weight" in tensors:
        freq_factors = loader._gguf_tensor(tensors["rope_freqs.weight"]).reshape(-1).float()
    config = ModelConfig.from_gguf(f.metadata, set(tensors), freq_factors)
    shard = shard_for(config)
    weights = {}
    for t in f.tensors:
        name = loader.hf_name(t.name)
        if name is None:
            continue
        part = _slice_gguf(t, split_of(name) if shard.sharded else None, shard, TensorInfo)
        try:
            value = loader._gguf_tensor(part)
        except Exception as exc:
            raise loader.CheckpointError(f"{path}: tensor {t.name!r} cannot be read: {exc}") from None
        if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            # llama.cpp permutes rows within each head: whole local heads, so undo it per local head
            heads = shard.num_heads if ".q_proj." in name else shard.num_kv_heads
            value = loader._unpermute_rows(value, heads)
        weights[name] = value
    tokenizer = Tokenizer.from_gguf_metadata(f.metadata) if with_tokenizer and \
        "tokenizer.ggml.tokens" in f.metadata else None
    return loader.Checkpoint(config, weights, tokenizer, {}, name=f.metadata.get("general.name") or path.stem,
                             file_bytes=path.stat().st_size, source_format="gguf"), shard


def _slice_gguf(t, how, shard: ShardSpec, TensorInfo):
    """A TensorInfo holding only this rank's rows / whole blocks of columns (still the file's bytes)."""
    import gguf

    if how is None:
        return t
    split, part = how
    start, stop = shard.rows(part)
    kind = gguf.GGMLQuantizationType(t.type)
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    if len(t.shape) == 2 and t.shape[1] % block:
        raise ParallelError(f"tensor {t.name!r} ({kind.name}, shape {list(t.shape)}): its rows are not whole blocks "
                            f"of {block}, so it cannot be split by blocks; use tensor_parallel=1 for this file")
    if len(t.shape) == 1:
        if split == "cols":
            return t
        if start % block or stop % block:
            raise ParallelError(f"tensor {t.name!r} ({kind.name}, blocks of {block}): rows {start}..{stop} of this "
                                f"rank's shard do not fall on block boundaries")
        return TensorInfo(t.name, (stop - start,), t.type, t.data[start // block * block_bytes:
                                                                  stop // block * block_bytes])
    rows, cols = t.shape
    raw = t.data.reshape(rows, cols // block * block_bytes)  # one row of blocks per output feature
    if split == "rows":
        return TensorInfo(t.name, (stop - start, cols), t.type, raw[start:stop])
    if start % block or stop % block:
        raise ParallelError(
            f"tensor {t.name!r} ({kind.name}, blocks of {block} columns): this rank's columns {start}..{stop} of "
            f"{cols} do not fall on a block boundary (each rank's share, {stop - start} columns, must be a multiple "
            f"of {block}); use a tensor_parallel that splits it into whole blocks, or a file with another format")
    return TensorInfo(t.name, (rows, stop - start), t.type,
                      raw[:, start // block * block_bytes:stop // block * block_bytes])


def check_split(path, world_size: int) -> ModelConfig:
    """Refuse a split before any rank starts: read the config (and a GGUF's tensor headers, no
    weights) and raise ParallelError when `world_size` ranks cannot split this model."""
    from . import loader
    from .gguf_file import GGUFFile, TensorInfo

    path = Path(path)
    if path.is_dir():
        from .encoder import is_encoder_config

        generation = loader._read_json(path / "generation_config.json", required=False) or {}
        raw = loader._read_json(path / "config.json")
        if is_encoder_config(raw):
            raise ParallelError(f"tensor_parallel={world_size}: {path} is an encoder ({raw.get('model_type')}); "
                                f"encoders run in one process (drop tensor_parallel)")
        config = ModelConfig.from_hf(raw, generation)
        for r in range(world_size):
            ShardSpec.for_rank(config, r, world_size)
        return config
    try:
        f = GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise loader.CheckpointError(f"{path}: cannot read GGUF (truncated or corrupt?): {exc}") from None
    config = ModelConfig.from_gguf(f.metadata, {t.name for t in f.tensors})
    for r in range(world_size):
        shard = ShardSpec.for_rank(config, r, world_size)
        for t in f.tensors:  # views of the mapped file: nothing is read
            name = loader.hf_name(t.name)
            if name is not None and world_size > 1:
                _slice_gguf(t, split_of(name), shard, TensorInfo)
    return config


# ---------------------------------------------------------------------------- checksum

WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 64 << 10
SAMPLES = 64


def model_checksum(path) -> str:
    """A digest of the model files, equal on every rank given the same model. Files up to 64 MiB
    are hashed whole; a larger file by its size, its first 4 MiB (the header: tensor names,
    shapes, offsets) and 64 evenly spaced 64 KiB samples: hashing a 140 GB model whole on every
    rank would read what sharded loading avoids reading."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in (path / "config.json", path / "generation_config.json") if p.exists()]
        files += _hf_files(path)
    else:
        files = [path]
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.name}:{size}\n".encode())
        with open(file, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                h.update(f.read())
                continue
            h.update(f.read(4 << 20))
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


# ---------------------------------------------------------------------------- process group

def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        t = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ParallelError(f"{TIMEOUT_ENV}: expected seconds, got {value!r}") from None
    if t <= 0:
        raise ParallelError(f"{TIMEOUT_ENV}: expected seconds > 0, got {value!r}")
    return t


class Group:
    """This rank's place in the tensor-parallel group: the compute group (collectives inside a
    step, with a timeout) and the control group (gloo: the leader's commands, no short timeout)."""

    def __init__(self, world_size: int, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.device = device
        self.timeout_s = timeout_s()
        self.broken = False
        env_world = os.environ.get("WORLD_SIZE")
        if not dist.is_initialized():
            if env_world is None and world_size != 1:
                raise ParallelError(
                    f"tensor_parallel={world_size}: no ranks to join (WORLD_SIZE is not set): run under "
                    f"`torchrun --nproc-per-node {world_size} ...`, or `portinfer generate --tensor-parallel "
                    f"{world_size}`, which launches the ranks itself")
        self.collective = COLLECTIVE_BACKENDS.get(device.type)
        if self.collective is None:
            raise ParallelError(f"tensor parallel: no collective library is known for device type {device.type!r} "
                                f"(known: {', '.join(f'{k} -> {v}' for k, v in COLLECTIVE_BACKENDS.items())})")
        if self.collective == "hccl":
            import torch_npu  # noqa: F401  (registers the hccl process-group backend)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        if not dist.is_initialized():
            if env_world is None:  # N = 1 outside any launcher: a group of one (the code path, for smoke tests)
                dist.init_process_group(self.collective, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout)
            else:
                dist.init_process_group(self.collective, timeout=timeout)
            self.owns_group = True
        else:
            self.owns_group = False
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != world_size:
            raise ParallelError(f"tensor_parallel={world_size}, but {self.world_size} ranks were launched "
                                f"(WORLD_SIZE={self.world_size}): launch exactly {world_size}")
        self.compute = dist.group.WORLD
        # commands wait as long as the leader is idle (a server between requests): a long timeout
        self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365)) \
            if self.collective != "gloo" or self.world_size > 1 else self.compute
        me = (socket.gethostname(), os.getpid())
        self.peers = [None] * self.world_size
        dist.all_gather_object(self.peers, me, group=self.control)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ failures

    def _dead_ranks(self) -> list:
        host = socket.gethostname()
        return [r for r, (h, pid) in enumerate(self.peers) if r != self.rank and h == host and not _alive(pid)]

    def failure(self, what: str, exc: BaseException) -> ParallelError:
        """The error a collective's failure becomes: it names the rank that stopped, when it can."""
        self.broken = True
        dead = self._dead_ranks()
        if not dead:  # the peer may still be going down: look once more
            time.sleep(0.5)
            dead = self._dead_ranks()
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if dead:
            who = ", ".join(f"rank {r} (pid {self.peers[r][1]})" for r in dead)
            return ParallelError(f"tensor parallel rank {self.rank}: {what} failed: {who} is no longer running; "
                                 f"stopping ({first})")
        return ParallelError(f"tensor parallel rank {self.rank}: {what} failed: no answer from the other ranks "
                             f"within {self.timeout_s:g} s ({TIMEOUT_ENV}); a rank hung or died on another host "
                             f"({first})")

    def _run(self, what, fn, tensors=()):
        """fn(), a collective on `tensors`; returns once the collective library holds none of them.

        Gloo's worker thread drops its work object (and with it its references to the tensors) a
        little after the caller's wait returned. If Python had dropped a tensor by then, that last
        reference deallocates the tensor's Python object from the gloo thread, which takes the GIL;
        when the interpreter is finalizing by then (the leader exits right after its STOP broadcast),
        the thread is unwound inside a noexcept destructor: "terminate called without an active
        exception", SIGABRT after all the work was done (2 of 3 full test runs on a loaded 2-vCPU VM;
        core: ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork -> THPVariable_dealloc -> take_gil). So
        each collective waits until the tensors' use counts are back where they were (microseconds);
        one still held after a second is kept referenced by this module instead (freed only at module
        teardown, the last step of the interpreter's exit)."""
        if self.broken:
            raise ParallelError(f"tensor parallel rank {self.rank}: {what}: the group already failed")
        base = [t._use_count() for t in tensors]
        try:
            out = fn()
        except RuntimeError as exc:  # DistBackendError, gloo's connection / timeout errors
            raise self.failure(what, exc) from None
        deadline = None
        for t, n in zip(tensors, base):
            while t._use_count() > n:
                now = time.monotonic()
                deadline = deadline or now + 1.0
                if now > deadline:
                    _KEPT_PAST_EXIT.append(t)
                    break
                time.sleep(0)
        return out

    # ------------------------------------------------------------ collectives inside a step

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (x contiguous)."""
        if self.world_size == 1:
            return x
        if not x.is_contiguous():
            x = x.contiguous()
        self._run("all_reduce", lambda: self.dist.all_reduce(x, group=self.compute), (x,))
        return x

    def all_gather_vocab(self, logits: torch.Tensor, shard: ShardSpec) -> torch.Tensor:
        """[M, local vocab] -> [M, V]: each rank's slice of the vocabulary, in rank order."""
        if self.world_size == 1:
            return logits
        M = logits.shape[0]
        mine = logits.new_zeros(M, shard.vocab_chunk)
        mine[:, :logits.shape[1]] = logits
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._run("all_gather (logits)", lambda: self.dist.all_gather(parts, mine, group=self.compute), (mine, *parts))
        return torch.cat(parts, dim=1)[:, :shard.vocab_size]

    # ------------------------------------------------------------ control channel

    def broadcast_control(self, t: torch.Tensor, what: str) -> torch.Tensor:
        self._run(what, lambda: self.dist.broadcast(t, src=0, group=self.control), (t,))
        return t

    def gather_objects(self, obj, what: str) -> list:
        out = [None] * self.world_size
        self._run(what, lambda: self.dist.all_gather_object(out, obj, group=self.control))
        return out

    def close(self):
        if self.owns_group and not self.broken and self.dist.is_initialized():
            self.dist.destroy_process_group()


_KEPT_PAST_EXIT = []  # Group._run: tensors the collective library still held a second after a collective


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as dead
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def check_same_model(group: Group, path) -> None:
    """Every rank must load the same files: compare their checksums (an error names the ranks)."""
    mine = (str(path), model_checksum(path))
    everyone = group.gather_objects(mine, "model checksum exchange")
    if len({digest for _, digest in everyone}) > 1:
        lines = "; ".join(f"rank {r}: {p} ({d[:12]})" for r, (p, d) in enumerate(everyone))
        raise ParallelError(f"tensor parallel: the model files differ across ranks ({lines}); every rank must load "
                            f"the same model")


def release_freed_memory() -> None:
    """Return the heap memory freed during a sharded load (the slices read before each backend
    packed its copy) to the OS: glibc keeps freed chunks below its adaptive mmap threshold
    (up to 32 MiB) in the heap, where they would count in the rank's RSS."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to return
        pass


def default_device(device_type: str) -> torch.device | None:
    """The device of this rank: the local rank's accelerator (CUDA / NPU), None on CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    if device_type == "npu":
        torch.npu.set_device(local)
        return torch.device("npu", local)
    return None


def share_cpu_threads():
    """N ranks on one host share its cores: unless set, each takes cores / local ranks threads."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local_world)
    os.environ.setdefault("PORTINFER_NUM_THREADS", str(threads))
    torch.set_num_threads(min(torch.get_num_threads(), threads))


# ---------------------------------------------------------------------------- leader and followers

STOP, NEW_CACHE, FREE_CACHE, STEP = 0, 1, 2, 3
HEADER = 8  # int64 words: [command, cache id, B (rows), S (tokens per row or max_len), all_rows, plans,
#                           first cache row, cache rows]


class LeaderDecoder:
    """Rank 0's decoder: every call is first sent to the followers, then run here.
    Caches get ids; a cache the leader drops is freed on the followers before the next command."""

    def __init__(self, decoder, group: Group):
        self._decoder = decoder
        self._group = group
        self._next_id = 0
        self._freed = []
        self._stopped = False

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def _send(self, command, cache_id=-1, B=0, S=0, all_rows=0, plans=0, row0=0, cache_rows=0, payload=None):
        header = torch.tensor([command, cache_id, B, S, all_rows, plans, row0, cache_rows], dtype=torch.int64)
        self._group.broadcast_control(header, "broadcast of the next step")
        if payload is not None:
            self._group.broadcast_control(payload.to(torch.int64).contiguous(), "broadcast of token ids")

    def _flush_freed(self):
        while self._freed:
            self._send(FREE_CACHE, self._freed.pop())

    def new_cache(self, batch_size: int, max_len: int):
        self._flush_freed()
        cache_id, self._next_id = self._next_id, self._next_id + 1
        self._send(NEW_CACHE, cache_id, batch_size, max_len)
        cache = self._decoder.new_cache(batch_size, max_len)
        cache.parallel_id = cache_id
        weakref.finalize(cache, self._freed.append, cache_id)
        return cache

    def forward(self, ids, n_new, cache, all_rows=False, rows=None, plans=False):
        """Decoder.forward, after sending the followers the same call: ids, n_new, and the whole
        cache's fill state (so a row reset on rank 0, a server's freed slot, is reset everywhere)."""
        self._flush_freed()
        B, S = ids.shape
        filled = list(cache.filled) if cache is not None else []
        row0 = rows.start or 0 if rows is not None else 0
        payload = torch.cat([ids.reshape(-1).cpu(), torch.tensor(list(n_new) + filled, dtype=torch.int64)])
        self._send(STEP, -1 if cache is None else cache.parallel_id, B, S, int(all_rows), int(plans), row0,
                   len(filled), payload)
        return self._decoder.forward(ids, n_new, cache, all_rows, rows, plans)

    def stop(self):
        if self._stopped or self._group.broken:
            return
        self._stopped = True
        self._send(STOP)


def follow(decoder, group: Group) -> None:
    """A follower's loop: run the leader's commands until it sends STOP (or fails)."""
    caches = {}
    header = torch.empty(HEADER, dtype=torch.int64)
    while True:
        group.broadcast_control(header, "wait for the leader's next step")
        command, cache_id, B, S, all_rows, plans, row0, cache_rows = header.tolist()
        if command == STOP:
            return
        if command == NEW_CACHE:
            caches[cache_id] = decoder.new_cache(B, S)
        elif command == FREE_CACHE:
            caches.pop(cache_id, None)
        elif command == STEP:
            payload = group.broadcast_control(torch.empty(B * S + B + cache_rows, dtype=torch.int64), "token ids")
            ids = payload[:B * S].view(B, S)
            n_new = payload[B * S:B * S + B].tolist()
            cache, rows = (caches[cache_id], slice(row0, row0 + B)) if cache_id >= 0 else (None, None)
            if cache is not None:
                cache.filled[:] = payload[B * S + B:].tolist()  # the leader's fill state, whatever reset it
            decoder.forward(ids, n_new, cache, bool(all_rows), rows, bool(plans))
        else:
            raise ParallelError(f"tensor parallel rank {group.rank}: unknown command {command} from rank 0")


# ---------------------------------------------------------------------------- launcher

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list, world_size: int, grace_s: float | None = None) -> int:
    """Run `python *args` (`-m portinfer.cli generate ...`, or a script) as `world_size` ranks on this
    host: what torchrun does, minus elasticity. Rank 0 keeps stdin/stdout. When a rank fails, the
    others get `grace_s` (default: the collective timeout + 10 s) to fail on their own, then are
    killed; the exit status is the first failure's, and stderr names the rank. SIGINT / SIGTERM
    sent to the launcher go to every rank (a server stops gracefully on rank 0)."""
    if world_size < 1:
        raise ParallelError(f"--tensor-parallel: expected at least 1 rank, got {world_size}")
    grace_s = timeout_s() + 10 if grace_s is None else grace_s
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size))
    procs = []
    for rank in range(world_size):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, *args], env=env,
                                      stdin=None if rank == 0 else subprocess.DEVNULL))
    first_failure, deadline, stopping = None, None, []

    def forward(signum, frame):  # Ctrl-C, or SIGTERM from a service manager: every rank gets it
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            if first_failure is None and not stopping:
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    first_failure = failed[0]
                    deadline = time.monotonic() + grace_s
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:  # stopped from outside: every rank ending by that signal (or cleanly) is a clean stop
        ok = all(p.returncode in (0, -stopping[0]) for p in procs)
        return 0 if ok else 128 + stopping[0]
    if first_failure is None:
        return 0
    code = procs[first_failure].returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    print(f"portinfer: tensor-parallel rank {first_failure} (pid {procs[first_failure].pid}) failed with {how}; "
          f"the other ranks were stopped", file=sys.stderr)
    return code if code > 0 else 1


def launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun or `launch`) started it, else None."""
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and os.environ.get("WORLD_SIZE") is not None else None


__all__ = ["Group", "LeaderDecoder", "ParallelError", "ShardSpec", "check_same_model", "check_split", "follow",
           "launch", "launched_rank", "load_sharded_checkpoint", "model_checksum", "split_of"]
