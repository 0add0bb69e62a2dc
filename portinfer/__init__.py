"""portinfer: a hardware-portable inference runtime for open-weights transformer models."""
from . import backends

__version__ = "0.1.0"


def load(path=None, backend="auto", dtype=None, fallback="warn", **options):
    """Load a model (a Hugging Face directory or a .gguf file; None: the embedded default).
    options: see portinfer.runtime.load (plans=True|False, device=...)."""
    from .runtime import load as _load

    return _load(path, backend=backend, dtype=dtype, fallback=fallback, **options)


def check(backend, ops=None, dtypes=None, **options):
    """Run the conformance suite for a backend against the float64 reference (see portinfer.conformance)."""
    from .conformance import check as _check

    return _check(backend, ops=ops, dtypes=dtypes, **options)


__all__ = ["backends", "check", "load", "__version__"]
