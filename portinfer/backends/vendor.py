"""What the vendor adapters (ascend.py, kunlun.py) share: the torch backend on a vendor's
torch device, with the vendor's fused kernels where the plugin provides them.

A vendor device plugs into PyTorch (torch_npu's `npu`, torch_xmlir's Kunlun device), so
the `torch` backend already runs every op there as generic torch. An adapter adds:

- `probe()`: whether the plugin is importable and sees a device, and if not, exactly which
  of the two is missing;
- `FUSED_KERNELS`: op -> (module, function, when): the ops that call a vendor fused kernel
  when the installed plugin has it and the case meets `when`; every other op, or a case
  outside `when`, runs the generic torch path. `kernel_table()` and `info()` show it.

The adapters are tested here with fake plugin modules (tests/test_vendor_adapters.py);
on hardware, `portinfer check --backend ascend|kunlun` is what proves them.
"""
from __future__ import annotations

import importlib

from .spec import OPS
from .torch_backend import TorchBackend


def _version(module) -> str:
    version = getattr(module, "__version__", None)
    return str(version) if isinstance(version, str) else "(version unknown)"


class VendorTorchBackend(TorchBackend):
    plugin_module: str = ""  # the vendor's torch plugin, e.g. "torch_npu"
    plugin_what: str = ""  # what it is, for messages
    device_what: str = ""  # e.g. "Ascend NPU"
    # op -> (module, function, when): the vendor kernel an op calls when present
    FUSED_KERNELS: dict = {}
    # op -> why it stays generic torch (for ops a reader might expect to be fused)
    GENERIC_NOTES: dict = {}

    @classmethod
    def device_count(cls, plugin) -> int:
        """Devices the plugin sees (override)."""
        raise NotImplementedError

    @classmethod
    def probe(cls):
        try:
            plugin = importlib.import_module(cls.plugin_module)
        except ImportError as exc:
            return False, f"{cls.plugin_module} ({cls.plugin_what}) is not installed: {exc}"
        except Exception as exc:  # a broken plugin install: say so, never raise
            return False, f"importing {cls.plugin_module} failed: {type(exc).__name__}: {exc}"
        try:
            count = int(cls.device_count(plugin))
        except Exception as exc:
            return False, (f"{cls.plugin_module} {_version(plugin)} is installed but asking it for devices failed: "
                           f"{type(exc).__name__}: {exc}")
        if count <= 0:
            return False, (f"{cls.plugin_module} {_version(plugin)} is installed but sees no {cls.device_what} "
                           f"(device count 0: no device, driver not loaded, or none visible to this process)")
        return True, ""

    @classmethod
    def kernel_table(cls) -> dict:
        """op -> what runs it: 'module.function (when)' for fused kernels, else 'generic torch ...'."""
        table = {}
        for op in OPS:
            if op in cls.FUSED_KERNELS:
                module, function, when = cls.FUSED_KERNELS[op]
                table[op] = f"{module}.{function}" + (f" ({when})" if when else "")
            else:
                table[op] = "generic torch" + (f" ({cls.GENERIC_NOTES[op]})" if op in cls.GENERIC_NOTES else "")
        return table

    def __init__(self, device=None):
        self.plugin = importlib.import_module(self.plugin_module)  # registers the vendor device with torch
        super().__init__(device if device is not None else self.default_device)
        self.kernels = {}  # op -> the vendor callable, for the kernels this plugin version has
        for op, (module_name, function, _) in self.FUSED_KERNELS.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            kernel = getattr(module, function, None)
            if callable(kernel):
                self.kernels[op] = kernel

    def info(self):
        fused = [op for op in OPS if op in self.kernels]
        absent = [f"{m}.{f}" for op, (m, f, _) in self.FUSED_KERNELS.items() if op not in self.kernels]
        out = {"device": str(self.device), "plugin": f"{self.plugin_module} {_version(self.plugin)}",
               "fused": ", ".join(f"{op}={self.kernel_table()[op]}" for op in fused) or "none",
               "generic torch": ", ".join(op for op in OPS if op not in self.kernels)}
        if absent:
            out["kernels missing from this plugin"] = ", ".join(absent)
        return out

    def use_kernel(self, op, ok=True):
        """The vendor kernel for `op` when this plugin has it and the case qualifies (`ok`), else None."""
        return self.kernels.get(op) if ok else None
