"""Backends: the op contract (spec), the Backend protocol (base), the registry, placement."""
from .base import PROTOCOL_VERSION, Backend
from .registry import (BackendUnavailable, ENTRY_POINT_GROUP, available, entries, entry, get, names, refresh,
                       register, unregister)
from .spec import OPS, PreparedLinear, QuantizedWeight, RotaryParams, UnsupportedOpError

__all__ = [
    "PROTOCOL_VERSION", "Backend", "BackendUnavailable", "ENTRY_POINT_GROUP", "OPS", "PreparedLinear",
    "QuantizedWeight", "RotaryParams", "UnsupportedOpError", "available", "entries", "entry", "get", "names",
    "refresh", "register", "unregister",
]
