"""The model runtime: checkpoint formats, ModelConfig, the decoder, KV cache, engine, sampling, tokenizer."""
from .config import ConfigError, ModelConfig
from .engine import Generation, Model, Stream, load
from .loader import CheckpointError, default_model_path, load_checkpoint
from .model import KVCache, NonFiniteError
from .sampling import SamplingParams

__all__ = ["CheckpointError", "ConfigError", "Generation", "KVCache", "Model", "ModelConfig", "NonFiniteError",
           "SamplingParams", "Stream", "default_model_path", "load", "load_checkpoint"]
