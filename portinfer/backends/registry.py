"""The backend registry: one place that knows every backend.

Built-ins are listed below by import path (imported on first use, so a backend whose
dependencies are missing is still listed, with the reason). Out-of-tree backends
register through the entry-point group `portinfer.backends` (name = "pkg.module:Class").
A backend built for another protocol version is listed as unavailable and refused by
`get` with a message naming both versions.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata

from .base import PROTOCOL_VERSION, Backend

ENTRY_POINT_GROUP = "portinfer.backends"

BUILTIN = {
    "reference": "portinfer.backends.reference:ReferenceBackend",
    "torch": "portinfer.backends.torch_backend:TorchBackend",
    "cpu": "portinfer.backends.cpu:CpuBackend",
    "triton": "portinfer.backends.triton:TritonBackend",
    "ascend": "portinfer.backends.ascend:AscendBackend",
    "kunlun": "portinfer.backends.kunlun:KunlunBackend",
}

# backend="auto" takes the first available of these (vendor devices first, then CPU kernels)
AUTO_ORDER = ("triton", "ascend", "kunlun", "cpu", "torch")


class BackendUnavailable(RuntimeError):
    """The named backend is registered but cannot run here (the message says why)."""


@dataclass
class BackendEntry:
    name: str
    target: str  # "module:Class"
    origin: str  # "builtin" or "entry point (dist name)"
    cls: type | None = None
    load_error: str = ""

    def load(self):
        if self.cls is None and not self.load_error:
            module_name, _, attr = self.target.partition(":")
            try:
                self.cls = getattr(importlib.import_module(module_name), attr)
            except Exception as exc:  # a broken plugin must not break the registry
                self.load_error = f"cannot import {self.target}: {type(exc).__name__}: {exc}"
        return self.cls

    @property
    def protocol_version(self):
        cls = self.load()
        return getattr(cls, "protocol_version", None) if cls else None

    def status(self) -> tuple[bool, str]:
        """(available, reason if not)."""
        cls = self.load()
        if cls is None:
            return False, self.load_error
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            return False, f"{self.target} is not a portinfer.backends.Backend subclass"
        if cls.protocol_version != PROTOCOL_VERSION:
            return False, (f"built for backend protocol version {cls.protocol_version}, but this portinfer "
                           f"speaks protocol version {PROTOCOL_VERSION}; rebuild it against this portinfer")
        try:
            return cls.probe()
        except Exception as exc:
            return False, f"probe failed: {type(exc).__name__}: {exc}"


_entries: dict[str, BackendEntry] | None = None


def _scan() -> dict[str, BackendEntry]:
    entries = {name: BackendEntry(name, target, "builtin") for name, target in BUILTIN.items()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in entries and entries[ep.name].origin == "builtin":
            continue  # a plugin cannot shadow a built-in name
        dist = getattr(ep, "dist", None)
        entries[ep.name] = BackendEntry(ep.name, ep.value, f"entry point ({dist.name if dist else '?'})")
    return entries


def _all() -> dict[str, BackendEntry]:
    global _entries
    if _entries is None:
        _entries = _scan()
    return _entries


def refresh():
    """Rescan entry points (after installing a plugin in this process)."""
    global _entries
    _entries = None


def register(name: str, cls: type, origin: str = "registered in process"):
    """Register a backend class directly (tests, notebooks). Replaces an entry of that name."""
    entry = BackendEntry(name, f"{cls.__module__}:{cls.__qualname__}", origin, cls=cls)
    _all()[name] = entry
    return entry


def unregister(name: str):
    _all().pop(name, None)


def names() -> list[str]:
    """Every registered backend name, available here or not."""
    return list(_all())


def entries() -> list[BackendEntry]:
    return list(_all().values())


def entry(name: str) -> BackendEntry:
    try:
        return _all()[name]
    except KeyError:
        raise ValueError(f"backend: unknown name {name!r}; registered backends are {', '.join(names())}") from None


def available(name: str) -> bool:
    return entry(name).status()[0]


def parse_spec(text: str) -> tuple[str, dict]:
    """'NAME' or 'NAME[SETTING]' -> (name, constructor options). The setting is the backend's own
    (Backend.options_from_setting): cpu[int8] / cpu[fp32] / cpu[int8-all] choose the cpu backend's quant route, so
    every command that takes --backend (generate, serve, bench) can choose it the same way."""
    if not isinstance(text, str):
        raise ValueError(f"backend: expected a name such as 'cpu' or 'cpu[int8]', got {text!r}")
    name, bracket, rest = text.partition("[")
    if not bracket:
        return name, {}
    if not rest.endswith("]") or "[" in rest or rest == "]":
        raise ValueError(f"backend: expected NAME or NAME[SETTING] (e.g. cpu[int8]), got {text!r}")
    return name, _usable(name).cls.options_from_setting(rest[:-1])


def _usable(name: str) -> BackendEntry:
    """The entry of `name`, its class loaded; BackendUnavailable (with the reason) when it cannot run here."""
    e = entry(name)
    ok, reason = e.status()
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is not available here: {reason}")
    return e


def get(name: str = "auto", device=None, **options) -> Backend:
    """An instance of the named backend ("auto": the best available here; 'NAME[SETTING]': see parse_spec)."""
    name, from_spec = parse_spec(name)
    if name == "auto":
        name = auto_name()
    return _usable(name).cls(device=device, **{**from_spec, **options})


def auto_name() -> str:
    for name in AUTO_ORDER:
        if name in _all() and available(name) and entry(name).cls.auto_eligible():
            return name
    return "torch"
