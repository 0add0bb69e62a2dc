"""kunlun: the torch backend on Kunlunxin (Baidu Kunlun) XPUs through their PyTorch plugin,
torch_xmlir, calling Kunlunxin's fused kernels (the `kunlun_ops` library vLLM-Kunlun uses)
for the ops that have one.

torch_xmlir (installed by Kunlunxin's xpytorch-*.run package) runs torch in a
CUDA-compatible mode: the XPU is torch's `cuda` device, so this backend's device is
`cuda`. Devices are counted with torch_xmlir.xpu.device_count() (torch.xpu is Intel's
and reports 0 there). Available only where torch_xmlir imports and sees an XPU; otherwise
`portinfer backends` lists it with the reason. Which op runs what
(`KunlunBackend.kernel_table()`):

| op        | on Kunlun                                                            |
|-----------|----------------------------------------------------------------------|
| rms_norm  | kunlun_ops.rmsnorm(x, weight_fp32, eps, out=y)                       |
| silu_mul  | kunlun_ops.silu_and_mul(x, axis=-1, turn=True, out=y): silu(first half) * second half |
| linear    | generic torch: torch_xmlir swaps F.linear for its fused FC by default (XMLIR_ENABLE_LINEAR_FC_FUSION=1) |
| attention | generic torch SDPA: torch_xmlir picks its flash-attention kernel in SDPA's dispatcher |
| embedding, layer_norm, rope, gelu | generic torch                                |

A kernel missing from the installed libraries runs the generic torch path; `info()` says
which. Call signatures follow vLLM-Kunlun's call sites; `portinfer check --backend kunlun`
on an XPU is what proves them.
"""
from __future__ import annotations

import torch

from .vendor import VendorTorchBackend


class KunlunBackend(VendorTorchBackend):
    name = "kunlun"
    default_device = "cuda"
    plugin_module = "torch_xmlir"
    plugin_what = "Kunlunxin's PyTorch plugin, installed by the xpytorch-*.run package"
    device_what = "Kunlun XPU"
    FUSED_KERNELS = {
        "rms_norm": ("kunlun_ops", "rmsnorm", ""),
        "silu_mul": ("kunlun_ops", "silu_and_mul", ""),
    }
    GENERIC_NOTES = {"linear": "torch_xmlir's fused FC behind F.linear",
                     "attention": "SDPA, torch_xmlir's flash-attention kernel behind it"}

    @classmethod
    def device_count(cls, plugin) -> int:
        return plugin.xpu.device_count()

    def _rms_norm(self, x, weight, eps):
        kernel = self.use_kernel("rms_norm")
        if kernel is None:
            return super()._rms_norm(x, weight, eps)
        out = self.new_output(x.shape, x.dtype)
        kernel(x.contiguous(), weight.to(torch.float32), eps, out=out)
        return out

    def _silu_mul(self, x):
        kernel = self.use_kernel("silu_mul")
        if kernel is None:
            return super()._silu_mul(x)
        out = self.new_output((x.shape[0], x.shape[1] // 2), x.dtype)
        kernel(x.contiguous(), axis=-1, turn=True, out=out)
        return out
