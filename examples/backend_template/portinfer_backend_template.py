"""A portinfer backend for a new accelerator, in one file: copy it and fill in your kernels.

Porting is incremental. `ops` lists what this backend computes; every other op of the
contract (portinfer.backends.OPS) falls back to the `torch` backend, visibly, in the model's
placement report. Start with the ops that decide speed (linear, attention), prove each with

    portinfer check --backend template

and add the next. The public methods of `Backend` validate every input against the op
contract and call `supports` before your `_op` method runs, so a kernel here never sees a
bad shape, dtype, device or an op/dtype it did not declare.

On a real device: set `default_device` to your torch device ("npu", "xpu", ...), make
`probe` import your torch plugin and count devices (return False and the reason when it
cannot), and if tensors cross into your device memory through your own copies, declare
`memory_space` and implement `copy_to_memory` / `copy_from_memory`.
"""
import torch
import torch.nn.functional as F

from portinfer.backends import Backend, PreparedLinear
from portinfer.backends.spec import dtype_name, weight_format

F32 = torch.float32


class TemplateBackend(Backend):
    name = "template"
    protocol_version = 1  # the portinfer backend protocol this file was written for
    default_device = "cpu"
    activation_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    native_weight_formats = ("fp32", "fp16", "bf16")
    ops = ("linear", "rms_norm", "silu_mul")

    @classmethod
    def probe(cls):
        """(usable here, why not): cheap, never raises."""
        return True, ""

    def supports(self, op, **meta):
        if not super().supports(op, **meta):  # checks `ops` and `activation_dtypes`
            return False
        fmt = meta.get("weight_format")
        return fmt is None or fmt in self.native_weight_formats  # GGUF blocks fall back

    def _prepare_linear(self, weight, dtype):
        # once per weight, at load: convert to your kernel's layout here (tiles, panels, ...)
        packed = weight.to(device=self.device, dtype=dtype).contiguous()  # [N, K]
        n, k = packed.shape
        return PreparedLinear(self.name, n, k, dtype, dtype_name(dtype), weight_format(weight), packed)

    def _linear(self, x, w, bias):
        # x [M, K], w.payload [N, K] -> [M, N]; accumulate in fp32, round once
        y = x.to(F32) @ w.payload.to(F32).T
        if bias is not None:
            y += bias.to(F32)
        out = self.new_output(y.shape, x.dtype)  # NaN-poisoned under `portinfer check`: write every element
        out.copy_(y)
        return out

    def _rms_norm(self, x, weight, eps):
        # x [M, H], weight [H]: x / sqrt(mean(x^2) + eps) * weight, statistics in fp32
        xf = x.to(F32)
        out = self.new_output(x.shape, x.dtype)
        out.copy_(xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps) * weight.to(F32))
        return out

    def _silu_mul(self, x):
        # x [M, 2I] = [gate | up] -> silu(gate) * up [M, I]
        half = x.shape[1] // 2
        out = self.new_output((x.shape[0], half), x.dtype)
        out.copy_(F.silu(x[:, :half].to(F32)) * x[:, half:].to(F32))
        return out
