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
runs the generic torch path; `info()` says which. A case outside a fused kernel's documented
shape limits is refused by `supports`, so it falls back visibly (placement report) instead of
raising on the device:

- npu_fusion_attention: head dim D <= 512 (Huawei Cloud ModelArts, "NPU_Flash_Attn融合算子约束":
  query [B, N1, S1, D] with N1 <= 2048 and D <= 512,
  https://support.huaweicloud.com/bestpractice-modelarts/modelarts_llm_train_5901150.html) and a
  multiple of 16 (CANN Ascend Transformer Boost flash attention, "约束说明": headSize must be a
  multiple of 16 on Atlas training / inference series products,
  https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/900beta1/API/ascendtbapi/ascendtb_01_0268.html).
- npu_rotary_mul: torch_npu's API reference up to Ascend Extension for PyTorch 6.0 ("约束说明": 4-D
  input, B and N <= 1000, D = 128; https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000832.html).
  The 7.0 reference (the kernel gained `rotary_mode`; ptaoplist_000862) allows any even D < 896: a
  plugin whose kernel takes `rotary_mode` is held to that instead. Signatures follow the torch_npu API
reference; `portinfer check --backend ascend` on an NPU is what proves each one.
"""
from __future__ import annotations

import torch

from .base import rotary_angles, softmax_mask
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

    # documented shape limits of the fused kernels (see the module docstring for the sources)
    FUSION_ATTENTION_MAX_D = 512
    FUSION_ATTENTION_D_MULTIPLE = 16
    ROTARY_MUL_D_LEGACY = (128,)  # torch_npu <= 6.0 reference: D = 128
    ROTARY_MUL_MAX_D = 896  # with rotary_mode (7.0 reference): even D < 896

    @classmethod
    def device_count(cls, plugin) -> int:
        return plugin.npu.device_count()

    def supports(self, op, **meta):
        if not super().supports(op, **meta):
            return False
        D = meta.get("D")
        if D is None:
            return True
        if op == "attention" and "attention" in self.kernels and meta.get("dtype") in (torch.float16, torch.bfloat16):
            return D <= self.FUSION_ATTENTION_MAX_D and D % self.FUSION_ATTENTION_D_MULTIPLE == 0
        if op == "rope" and "rope" in self.kernels and meta.get("style") == "neox" and meta.get("rotary_dim") == D:
            if _takes_argument(self.kernels["rope"], "rotary_mode"):
                return D % 2 == 0 and D < self.ROTARY_MUL_MAX_D
            return D in self.ROTARY_MUL_D_LEGACY
        return True

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
        keys, empty = softmax_mask(q_pos, kv_len, q.shape[2], k.shape[2], causal, q.device)
        # atten_mask is True where a key is dropped
        y = kernel(q.contiguous(), k.contiguous(), v.contiguous(), q.shape[1], "BNSD", atten_mask=~keys,
                   scale=scale, keep_prob=1.0)[0]
        return y.masked_fill(empty, 0.0)


def _takes_argument(kernel, name) -> bool:
    """Whether a torch_npu kernel has parameter `name` (its Python signature, else its op schema)."""
    import inspect

    try:
        return name in inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        pass
    schema = getattr(getattr(kernel, "default", kernel), "_schema", None)
    return any(a.name == name for a in getattr(schema, "arguments", ()))
