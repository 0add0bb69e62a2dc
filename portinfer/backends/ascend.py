"""ascend: the torch backend on Huawei Ascend NPUs (torch_npu's `npu` device), calling
torch_npu's fused kernels for the ops that have one.

Available only where torch_npu imports and sees an NPU; otherwise `portinfer backends`
lists it with the reason. Which op runs what (`AscendBackend.kernel_table()`):

| op         | on Ascend                                                       |
|------------|-----------------------------------------------------------------|
| rms_norm   | torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)          |
| rope       | torch_npu.npu_rotary_mul(x, cos, sin): neox style, full rotary_dim (cos/sin [B, 1, S, D]) |
| silu_mul   | torch_npu.npu_swiglu(x, dim=-1): silu(first half) * second half |
| gelu       | torch_npu.npu_gelu(x, approximate)                              |
| attention  | torch_npu.npu_fusion_attention(q, k, v, Hq, "BNSD", atten_mask, scale), fp16/bf16; atten_mask is True where a key is dropped |
| linear, embedding, layer_norm | generic torch (CANN's own MatMul, Gather, LayerNorm kernels) |

A kernel missing from the installed torch_npu version, or a case outside its conditions,
runs the generic torch path; `info()` says which. Signatures follow the torch_npu API
reference; `portinfer check --backend ascend` on an NPU is what proves each one.
"""
from __future__ import annotations

import torch

from .base import attention_mask, rotary_angles
from .vendor import VendorTorchBackend


class AscendBackend(VendorTorchBackend):
    name = "ascend"
    default_device = "npu"
    plugin_module = "torch_npu"
    plugin_what = "Ascend Extension for PyTorch: pip install torch-npu matching your torch and CANN versions"
    device_what = "Ascend NPU"
    FUSED_KERNELS = {
        "rms_norm": ("torch_npu", "npu_rms_norm", ""),
        "rope": ("torch_npu", "npu_rotary_mul", "neox style, full rotary_dim"),
        "silu_mul": ("torch_npu", "npu_swiglu", ""),
        "gelu": ("torch_npu", "npu_gelu", ""),
        "attention": ("torch_npu", "npu_fusion_attention", "fp16/bf16"),
    }
    GENERIC_NOTES = {"embedding": "CANN Gather", "linear": "F.linear, CANN MatMul", "layer_norm": "CANN LayerNorm"}

    @classmethod
    def device_count(cls, plugin) -> int:
        return plugin.npu.device_count()

    def _rms_norm(self, x, weight, eps):
        kernel = self.use_kernel("rms_norm")
        if kernel is None:
            return super()._rms_norm(x, weight, eps)
        return kernel(x.contiguous(), weight, epsilon=eps)[0]

    def _rope(self, x, pos, rotary):
        kernel = self.use_kernel("rope", rotary.style == "neox" and rotary.rotary_dim == x.shape[-1])
        if kernel is None:
            return super()._rope(x, pos, rotary)
        angles = rotary_angles(pos.to(x.device), rotary, torch.float32)  # [B, S, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, S, D]: the B1SD layout it broadcasts
        return kernel(x.contiguous(), torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype))

    def _silu_mul(self, x):
        kernel = self.use_kernel("silu_mul")
        if kernel is None:
            return super()._silu_mul(x)
        return kernel(x.contiguous(), dim=-1)

    def _gelu(self, x, approximate):
        kernel = self.use_kernel("gelu")
        if kernel is None:
            return super()._gelu(x, approximate)
        return kernel(x.contiguous(), approximate=approximate)

    def _attention(self, q, k, v, q_pos, kv_len, causal, scale):
        kernel = self.use_kernel("attention", q.dtype in (torch.float16, torch.bfloat16))
        if kernel is None:
            return super()._attention(q, k, v, q_pos, kv_len, causal, scale)
        visible = attention_mask(q_pos, kv_len, q.shape[2], k.shape[2], causal, q.device)  # [B, 1, Sq, Sk]
        any_visible = visible.any(dim=-1, keepdim=True)
        # a row with no visible key gets one dummy key (zeroed below) so the kernel never sees an empty row
        dropped = ~(visible | ~any_visible)
        y = kernel(q.contiguous(), k.contiguous(), v.contiguous(), q.shape[1], "BNSD", atten_mask=dropped,
                   scale=scale, keep_prob=1.0)[0]
        return y.masked_fill(~any_visible, 0.0)
