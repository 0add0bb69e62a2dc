"""Every Triton kernel compiles for a CUDA GPU (sm_90: H100/H200; sm_80: A100), on this
machine without one: triton's wheel carries the compiler down to ptxas, so a kernel that only
runs under the interpreter here is still checked for GPU-only errors (layouts, dot shapes and
dtypes, constexpr branches). The PTX also shows bf16 dots on tensor cores (wgmma for the big
sm_90 tiles of linear and prefill attention; the 16-row decode tile gets mma.sync) and fp32 dots
in IEEE precision unless TF32 was asked for.

The compilation runs in a subprocess (this file as a script), since under the test suite
TRITON_INTERPRET=1 is set and the kernels here are decorated for the interpreter."""
import json
import os
import subprocess
import sys

import pytest

def _variants():
    """(label, kernel module, kernel name, pointer dtypes, scalar args, constexprs, options, checks)."""
    lin = dict(M=100, N=100, K=100, M_BUCKET=128, stride_xm=104, stride_wn=100, stride_om=100)
    att = dict(Hq=32, Sq=300, D=128, GROUP=4, SQ_BUCKET=512, scale_log2e=0.1, stride_qb=9999, stride_qh=999,
               stride_qs=128, stride_kb=9999, stride_kh=999, stride_ks=128, stride_vb=9999, stride_vh=999,
               stride_vs=128, stride_ob=9999, stride_oh=999, stride_os=128)
    dec = dict(Hkv=8, GROUP=4, D=128, SPLIT_LEN=512, NUM_SPLITS=16, scale_log2e=0.1, stride_qb=9999, stride_qh=128,
               stride_kb=9999, stride_kh=999, stride_ks=128, stride_vb=9999, stride_vh=999, stride_vs=128)
    big = dict(num_warps=8, num_stages=3)
    return [
        ("linear bf16", "linear", "_linear_kernel", dict(out_ptr="bf16", x_ptr="bf16", w_ptr="bf16", bias_ptr="bf16"),
         lin, dict(HAS_BIAS=True, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee", EVEN_K=False, BLOCK_M=128,
                   BLOCK_N=128, BLOCK_K=64, GROUP_M=8), big, ["tensor_core", "wgmma"]),
        ("linear fp32 ieee", "linear", "_linear_kernel", dict(out_ptr="fp32", x_ptr="fp32", w_ptr="fp32", bias_ptr="fp32"),
         lin, dict(HAS_BIAS=False, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee", EVEN_K=True, BLOCK_M=64, BLOCK_N=64,
                   BLOCK_K=32, GROUP_M=8), {}, ["no_tf32"]),
        ("linear fp32 tf32", "linear", "_linear_kernel", dict(out_ptr="fp32", x_ptr="fp32", w_ptr="fp32", bias_ptr="fp32"),
         lin, dict(HAS_BIAS=False, UPCAST_TO_FP32=False, INPUT_PRECISION="tf32", EVEN_K=True, BLOCK_M=64, BLOCK_N=64,
                   BLOCK_K=32, GROUP_M=8), {}, ["tf32"]),
        ("linear bf16 x fp32 w (q4_1)", "linear", "_linear_kernel",
         dict(out_ptr="bf16", x_ptr="bf16", w_ptr="fp32", bias_ptr="bf16"), lin,
         dict(HAS_BIAS=True, UPCAST_TO_FP32=True, INPUT_PRECISION="ieee", EVEN_K=False, BLOCK_M=16, BLOCK_N=64,
              BLOCK_K=128, GROUP_M=1), {}, []),
        ("q8_0 gemv", "quantized_linear", "_quantized_gemv_kernel",
         dict(out_ptr="bf16", x_ptr="bf16", blocks_ptr="u8", bias_ptr="bf16"), lin,
         dict(FORMAT=0, HAS_BIAS=True, BLOCK_N=32, BLOCK_K=256), {}, []),
        ("q4_0 gemv", "quantized_linear", "_quantized_gemv_kernel",
         dict(out_ptr="fp16", x_ptr="fp16", blocks_ptr="u8", bias_ptr="fp16"), lin,
         dict(FORMAT=1, HAS_BIAS=False, BLOCK_N=32, BLOCK_K=256), {}, []),
        ("q4_0 matmul", "quantized_linear", "_quantized_matmul_kernel",
         dict(out_ptr="bf16", x_ptr="bf16", blocks_ptr="u8", bias_ptr="bf16"), lin,
         dict(FORMAT=1, HAS_BIAS=True, INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), {}, []),
        ("attention bf16 causal D=128", "attention", "_attention_kernel",
         dict(out_ptr="bf16", q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", q_pos_ptr="i32", kv_len_ptr="i32"), att,
         dict(CAUSAL=True, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee", BLOCK_M=128, BLOCK_N=64, BLOCK_D=128),
         big, ["tensor_core", "wgmma"]),
        ("attention fp32 D=80", "attention", "_attention_kernel",
         dict(out_ptr="fp32", q_ptr="fp32", k_ptr="fp32", v_ptr="fp32", q_pos_ptr="i32", kv_len_ptr="i32"),
         dict(att, D=80), dict(CAUSAL=False, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=32,
                               BLOCK_D=128), {}, ["no_tf32"]),
        ("decode split bf16", "attention_decode", "_decode_split_kernel",
         dict(acc_ptr="fp32", m_ptr="fp32", l_ptr="fp32", q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", q_pos_ptr="i32",
              kv_len_ptr="i32"), dec,
         dict(CAUSAL=True, UPCAST_TO_FP32=False, INPUT_PRECISION="ieee", EVEN_D=True, BLOCK_G=16, BLOCK_N=64,
              BLOCK_D=128), {},
         ["tensor_core"]),
        ("decode reduce", "attention_decode", "_decode_reduce_kernel",
         dict(out_ptr="bf16", acc_ptr="fp32", m_ptr="fp32", l_ptr="fp32"),
         dict(Hq=32, D=128, NUM_SPLITS=16, stride_ob=4096, stride_oh=128), dict(BLOCK_S=16, BLOCK_D=128), {}, []),
        ("rms_norm bf16", "rms_norm", "_rms_norm_kernel", dict(out_ptr="bf16", x_ptr="bf16", w_ptr="bf16"),
         dict(H=4096, eps=1e-6, stride_xm=4096, stride_om=4096), dict(BLOCK=4096), dict(num_warps=8), []),
        ("layer_norm fp16", "layer_norm", "_layer_norm_kernel",
         dict(out_ptr="fp16", x_ptr="fp16", w_ptr="fp16", b_ptr="fp16"),
         dict(H=1000, eps=1e-5, stride_xm=1000, stride_om=1000), dict(BLOCK=1024), {}, []),
        ("rope bf16 interleaved partial", "rope", "_rope_kernel",
         dict(out_ptr="bf16", x_ptr="bf16", cos_ptr="fp32", sin_ptr="fp32"),
         dict(H=32, S=100, D=128, HALF=32, stride_xb=9999, stride_xh=999, stride_xs=128, stride_ob=9999,
              stride_oh=999, stride_os=128),
         dict(INTERLEAVED=True, HAS_REST=True, BLOCK_H=32, BLOCK_HALF=32, BLOCK_REST=64), {}, []),
        ("silu_mul bf16", "silu_mul", "_silu_mul_kernel", dict(out_ptr="bf16", x_ptr="bf16"),
         dict(I=4864, stride_xm=9728, stride_om=4864), dict(BLOCK=1024), {}, []),
        ("gelu tanh bf16", "gelu", "_gelu_kernel", dict(out_ptr="bf16", x_ptr="bf16"),
         dict(C=3000, stride_xm=3000, stride_om=3000), dict(TANH=True, BLOCK=1024), {}, []),
        ("gelu erf fp32", "gelu", "_gelu_kernel", dict(out_ptr="fp32", x_ptr="fp32"),
         dict(C=3000, stride_xm=3000, stride_om=3000), dict(TANH=False, BLOCK=1024), {}, []),
        ("embedding fp16", "embedding", "_embedding_kernel", dict(out_ptr="fp16", ids_ptr="i64", table_ptr="fp16"),
         dict(H=896, stride_tv=896, stride_on=896), dict(BLOCK=1024), {}, []),
    ]


def compile_all(arch: int) -> dict:
    """Compile every variant for sm_<arch>; {label: problems (empty = fine)}."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    report = {}
    for label, module, name, pointers, scalars, constexprs, options, checks in _variants():
        fn = getattr(importlib.import_module(f"portinfer.kernels.{module}"), name)
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in pointers:
                signature[arg] = "*" + pointers[arg]
            else:  # scalars: the float ones are named, the rest (sizes, strides) are i32
                signature[arg] = "fp32" if isinstance(scalars.get(arg), float) else "i32"
        # what the JIT would specialize on: 16-byte aligned pointers, integers divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if arg in pointers or (isinstance(scalars.get(arg), int) and scalars[arg] % 16 == 0)}
        problems = []
        try:
            ptx = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options).asm["ptx"]
        except Exception as exc:
            report[label] = [f"{type(exc).__name__}: {str(exc)[-1500:]}"]
            continue
        if "tensor_core" in checks and "mma" not in ptx:
            problems.append("no mma in the PTX: the dot is not on tensor cores")
        if "wgmma" in checks and arch >= 90 and "wgmma" not in ptx:
            problems.append("no wgmma in the PTX: a big bf16 tile should use Hopper's warpgroup MMA")
        if "no_tf32" in checks and ".tf32" in ptx:
            problems.append("tf32 instructions in an IEEE fp32 dot")
        if "tf32" in checks and ".tf32" not in ptx:
            problems.append("no tf32 instructions although TF32 was asked for")
        report[label] = problems
    return report


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_for_cuda(arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    done = subprocess.run([sys.executable, __file__, str(arch)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == len(_variants())
    bad = {label: problems for label, problems in report.items() if problems}
    assert not bad, json.dumps(bad, indent=1)


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
