"""The sentence-transformers pipeline after the encoder, read from the files a model ships with.

    modules.json                  the stages in order: Transformer, Pooling, Normalize
    sentence_bert_config.json     the Transformer stage: max_seq_length, do_lower_case
    1_Pooling/config.json         the Pooling stage: which poolings, concatenated in a fixed order
    (Normalize has no file)       L2 normalization of the sentence embedding

Each stage is configured by its own JSON, as shipped (the habit of sentence-transformers'
models/Pooling.py and Normalize.py), and computes the same function as sentence-transformers
6.x over right-padded hidden states: sequence b's real tokens are rows [0, lengths[b]).
A directory without modules.json (a plain Hugging Face encoder) or without its pooling config
gets mean pooling, and a warning says so. A stage this runtime does not implement (Dense,
a Router, ...) is refused with its name rather than skipped, which would change every vector.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# sentence-transformers' concatenation order (Pooling.POOLING_MODES) and the legacy boolean keys
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# the last component of a modules.json "type" -> the stage it is
_STAGES = {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize"}


class PipelineError(ValueError):
    """A sentence-transformers file is unreadable or asks for something this runtime does not do."""


class PoolingWarning(UserWarning):
    """No pooling configuration was found: mean pooling is used."""


@dataclass(frozen=True)
class Pooling:
    """Pool token states [B, S, H] (right-padded, `lengths` real rows each) into [B, len(modes) * H]."""

    modes: tuple = ("mean",)

    def __post_init__(self):
        if not self.modes:
            raise PipelineError("pooling: expected at least one mode")
        for mode in self.modes:
            if mode not in POOLING_MODES:
                raise PipelineError(f"pooling mode {mode!r} is not supported; supported are {', '.join(POOLING_MODES)}")

    @classmethod
    def from_config(cls, cfg: dict, where: str = "1_Pooling/config.json") -> "Pooling":
        """From a 1_Pooling/config.json dict: `pooling_mode` (a name or a list, sentence-transformers 6)
        or the legacy `pooling_mode_*` booleans (no mode set: mean, as sentence-transformers does)."""
        if not isinstance(cfg, dict):
            raise PipelineError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        mode = cfg.get("pooling_mode")
        if mode is None:
            modes = tuple(m for key, m in _LEGACY_KEYS.items() if cfg.get(key)) or ("mean",)
        elif isinstance(mode, str):
            modes = (mode,)
        elif isinstance(mode, list) and all(isinstance(m, str) for m in mode):
            modes = tuple(mode)
        else:
            raise PipelineError(f"{where}: pooling_mode: expected a mode name or a list of them, got {mode!r}")
        try:
            return cls(modes)
        except PipelineError as exc:
            raise PipelineError(f"{where}: {exc}") from None

    def output_dim(self, hidden_size: int) -> int:
        return len(self.modes) * hidden_size

    def __call__(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H] (pooled in fp32), lengths int64 [B] (each >= 1) -> fp32 [B, len(modes) * H]."""
        hidden = hidden.float()
        if hidden.device.type == "cpu" and not hidden.requires_grad and lengths.device.type == "cpu":
            return torch.from_numpy(self._pool_numpy(hidden.numpy(), lengths.tolist()))
        B, S, H = hidden.shape
        lengths = lengths.to(hidden.device)
        positions = torch.arange(S, device=hidden.device)
        real = (positions[None, :] < lengths[:, None])[..., None]  # [B, S, 1]
        rows = torch.arange(B, device=hidden.device)
        out, summed = [], None
        for mode in self.modes:
            if mode == "cls":
                out.append(hidden[:, 0])
            elif mode == "lasttoken":
                out.append(hidden[rows, lengths - 1])
            elif mode == "max":
                out.append(hidden.masked_fill(~real, float("-inf")).amax(dim=1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                if summed is None:
                    summed = hidden.masked_fill(~real, 0.0).sum(dim=1)  # [B, H]
                count = lengths.to(torch.float32)[:, None]
                out.append(summed / (count if mode == "mean" else count.sqrt()))
            else:  # weightedmean: token i (from 1) weighs i
                weights = (positions + 1).to(torch.float32)[None, :, None] * real  # [B, S, 1]
                out.append((hidden * weights).sum(dim=1) / weights.sum(dim=1))
        return torch.cat(out, dim=-1)

    def _pool_numpy(self, hidden: np.ndarray, lengths: list) -> np.ndarray:
        """__call__ on the host in numpy, row by row over each row's real tokens: the same modes and
        arithmetic in fp32, without the torch ops (each costs more than its arithmetic here, and a cold one
        right after the encoder has streamed its weights ~5x a warm one)."""
        B, S, H = hidden.shape
        out = np.empty((B, len(self.modes) * H), dtype=np.float32)
        for b, n in enumerate(lengths):
            real = hidden[b, :n]  # [n, H]
            summed = None
            for j, mode in enumerate(self.modes):
                if mode == "cls":
                    v = hidden[b, 0]
                elif mode == "lasttoken":
                    v = hidden[b, n - 1]
                elif mode == "max":
                    v = real.max(axis=0)
                elif mode in ("mean", "mean_sqrt_len_tokens"):
                    if summed is None:
                        summed = real.sum(axis=0, dtype=np.float32)
                    v = summed / np.float32(n if mode == "mean" else np.sqrt(np.float32(n)))
                else:  # weightedmean: token i (from 1) weighs i
                    w = np.arange(1, n + 1, dtype=np.float32)
                    v = (real * w[:, None]).sum(axis=0, dtype=np.float32) / w.sum(dtype=np.float32)
                out[b, j * H:(j + 1) * H] = v
        return out


@dataclass
class SentencePipeline:
    """What follows the encoder: pooling, normalization, and the Transformer stage's settings."""

    pooling: Pooling = field(default_factory=Pooling)
    normalize: bool = False
    max_seq_length: int | None = None  # sentence_bert_config.json; None: the model's context
    do_lower_case: bool = False
    source: str = "default"  # where it came from ("modules.json" or why the default was used)

    def describe(self) -> str:
        parts = [f"pooling={'+'.join(self.pooling.modes)}", f"normalize={self.normalize}",
                 f"max_seq_length={self.max_seq_length}"]
        return ", ".join(parts) + f" ({self.source})"


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not readable JSON ({exc})") from None


def _mean_default(path: Path, why: str, **settings) -> SentencePipeline:
    warnings.warn(f"{path}: {why}; embeddings use mean pooling over the tokens, without normalization "
                  f"(add a sentence-transformers 1_Pooling/config.json to choose)", PoolingWarning, stacklevel=3)
    return SentencePipeline(Pooling(("mean",)), source=f"default: {why}", **settings)


def _transformer_settings(folder: Path) -> dict:
    """sentence_bert_config.json of the Transformer stage (optional): max_seq_length, do_lower_case."""
    file = folder / "sentence_bert_config.json"
    if not file.exists():
        return {}
    cfg = _read(file)
    if not isinstance(cfg, dict):
        raise PipelineError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    settings = {}
    max_len = cfg.get("max_seq_length")
    if max_len is not None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise PipelineError(f"{file}: max_seq_length: expected a positive integer, got {max_len!r}")
        settings["max_seq_length"] = max_len
    settings["do_lower_case"] = bool(cfg.get("do_lower_case", False))
    return settings


def load_pipeline(path) -> SentencePipeline:
    """The pipeline of a model directory (None, or no directory: the mean-pooling default, no warning
    for a model that has no directory to read)."""
    if path is None or not Path(path).is_dir():
        return SentencePipeline(source="default: no model directory")
    path = Path(path)
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return _mean_default(path, "no modules.json (not a sentence-transformers model)",
                             **_transformer_settings(path))
    modules = _read(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise PipelineError(f"{modules_file}: expected a list of module objects")
    stages = []
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _STAGES:
            raise PipelineError(f"{modules_file}: module {m.get('name', '?')!r} of type {m.get('type')!r} is not "
                                f"supported; supported are {', '.join(_STAGES)} (in that order)")
        stages.append((_STAGES[kind], path / str(m.get("path", ""))))
    kinds = [k for k, _ in stages]
    if kinds[:1] != ["transformer"] or kinds.count("transformer") != 1 or kinds.count("pooling") > 1 \
            or kinds.count("normalize") > 1 or ("normalize" in kinds and kinds[-1] != "normalize"):
        raise PipelineError(f"{modules_file}: expected Transformer, then Pooling, then optionally Normalize; "
                            f"got {' -> '.join(kinds)}")
    settings = _transformer_settings(stages[0][1])
    normalize = "normalize" in kinds
    pooling_folder = next((folder for kind, folder in stages if kind == "pooling"), None)
    if pooling_folder is None or not (pooling_folder / "config.json").exists():
        why = "modules.json has no Pooling stage" if pooling_folder is None else \
            f"missing pooling config {pooling_folder.name}/config.json"
        pipeline = _mean_default(path, why, **settings)
        pipeline.normalize = normalize
        return pipeline
    pooling = Pooling.from_config(_read(pooling_folder / "config.json"), str(pooling_folder / "config.json"))
    return SentencePipeline(pooling, normalize, source="modules.json", **settings)
