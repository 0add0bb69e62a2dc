"""The cpu backend's AMX paths (csrc/amx*.{h,cpp}): the permission request and its two outcomes,
the status every refusal names, and the tile kernels -- on the hardware where this CPU has usable
tiles, and everywhere on the software tile unit (the instructions' documented semantics in C++),
which runs the very same kernel code: the bf16 GEMM against the float64 reference and the
avx512bf16 GEMM, the int8 panels bit for bit against the avx512vnni path (the same integer sums
and the same fp32 operations), and the self-check's comparison itself."""
import math
import os
import subprocess
import sys

import pytest
import torch

from portinfer.backends import quant
from portinfer.backends.reference import ReferenceBackend
from portinfer.conformance.budget import budget, relative_error

cpu_mod = pytest.importorskip("portinfer.backends.cpu")
if cpu_mod._cpu is None:
    pytest.skip(f"cpu extension not built: {cpu_mod._IMPORT_ERROR}", allow_module_level=True)
if not hasattr(cpu_mod._cpu, "set_amx_emulation"):
    pytest.skip("not an x86-64 build: AMX is an x86-64 feature", allow_module_level=True)
CpuBackend = cpu_mod.CpuBackend
_cpu = cpu_mod._cpu

STATUS = _cpu.amx_status()
HARDWARE = STATUS["bf16"] and STATUS["int8"]
# the emulated paths need what the amx paths' other kernels need: AVX512-BF16 and AVX512-VNNI
_cpu.set_amx_emulation(True)
EMULABLE = "amx" in CpuBackend.simd_paths() and "amx" in CpuBackend.int8_paths()
_cpu.set_amx_emulation(STATUS["emulation"])  # on from the start only with PORTINFER_CPU_AMX=emulate
not_emulating = pytest.mark.skipif(STATUS["emulation"], reason="PORTINFER_CPU_AMX=emulate: the software tile unit "
                                                               "stands in for the hardware in this process")
needs_emulation = pytest.mark.skipif(not EMULABLE, reason="the software tile unit runs the amx kernels' AVX512-BF16 "
                                                          "/ AVX512-VNNI code, which this CPU lacks")
REFERENCE = ReferenceBackend(exact=True)
FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")


def _cpu_flags():
    try:
        return set(open("/proc/cpuinfo").read().split())
    except OSError:
        return None


@pytest.fixture
def emulated():
    default_simd = CpuBackend.simd()
    _cpu.set_amx_emulation(True)
    yield
    _cpu.set_amx_emulation(STATUS["emulation"])
    _cpu.set_int8_prefill(False)
    CpuBackend.set_simd(default_simd)


@not_emulating
def test_status_says_why_and_refusals_name_it():
    """The status is 'usable' exactly where both paths are offered; otherwise it says why (absent,
    disabled, refused, failed) and asking for either path repeats that reason."""
    flags = _cpu_flags()
    if flags is not None and not {"amx_tile", "amx_bf16", "amx_int8"} <= flags:
        assert STATUS["status"].startswith("absent: this CPU does not report amx-tile"), STATUS
    if HARDWARE:
        assert STATUS["status"] == "usable"
        assert CpuBackend.simd_paths()[0] == "amx" and CpuBackend.int8_paths()[0] == "amx"
        return
    assert STATUS["status"].split(":")[0] in ("absent", "disabled", "refused", "failed"), STATUS
    assert "amx" not in CpuBackend.simd_paths() and "amx" not in CpuBackend.int8_paths()
    assert "amx" in _cpu.int8_paths_compiled()
    with pytest.raises(ValueError, match="AMX here: " + STATUS["status"].split(":")[0]):
        CpuBackend.set_simd("amx")
    with pytest.raises(ValueError, match="int8 path 'amx': needs .*AMX here: " + STATUS["status"].split(":")[0]):
        CpuBackend.set_int8_path("amx")


@not_emulating
def test_permission_request_outcome_matches_the_cpu():
    """The request itself (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), made whatever the CPU
    reports: granted ('') where the CPU and kernel have AMX tiles, refused with the kernel's reason
    elsewhere -- the refusal the status turns into a fallback."""
    answer = _cpu._amx_request_permission()
    flags = _cpu_flags()
    if HARDWARE:
        assert answer == ""
    elif flags is not None and "amx_tile" not in flags:
        assert answer.startswith("the kernel refused arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): "), answer
    else:
        pytest.skip(f"the CPU reports AMX tiles; the request answered {answer!r} (status: {STATUS['status']})")


_FALLBACK = """
import torch
from portinfer.backends.cpu import CpuBackend, _cpu
from portinfer.backends.reference import ReferenceBackend
from portinfer.conformance.budget import budget, relative_error
s = _cpu.amx_status()
be = CpuBackend(quant_route="fp32")
g = torch.Generator().manual_seed(3)
x, w = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(24, 96, generator=g).bfloat16()
y = be.linear(x, be.prepare_linear(w, torch.bfloat16), None)
ref = ReferenceBackend(exact=True)
err = relative_error(y, ref.linear(x, ref.prepare_linear(w, torch.bfloat16), None))
assert err <= budget("linear", torch.bfloat16, 96), err
print(s["status"], "|", CpuBackend.simd(), "|", CpuBackend.int8_paths()[0])
"""


@pytest.mark.parametrize("setting", [None, "0"])
def test_fallback_when_not_usable_or_disabled(setting):
    """A process whose AMX is refused or absent -- or disabled by PORTINFER_CPU_AMX=0, which never
    asks -- runs the best other path by default, and a bf16 prefill still matches the reference."""
    env = dict(os.environ)
    env.pop("PORTINFER_CPU_SIMD", None)
    env.pop("PORTINFER_CPU_INT8_PATH", None)
    env.pop("PORTINFER_CPU_AMX", None)
    if setting is not None:
        env["PORTINFER_CPU_AMX"] = setting
    out = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    status, simd, int8 = [s.strip() for s in out.stdout.strip().splitlines()[-1].split("|")]
    if setting == "0":
        assert status.startswith("disabled: PORTINFER_CPU_AMX=0"), status
    if status == "usable":
        assert simd == "amx" and int8 == "amx"
    else:
        assert simd != "amx" and int8 != "amx", (status, simd, int8)
        assert simd == [p for p in CpuBackend.simd_paths() if p != "amx"][0], (simd, CpuBackend.simd_paths())


@needs_emulation
def test_selfcheck_expected_answers_agree_with_the_other_paths():
    """The self-check's expected answers (software tile unit) against the avx512vnni panels (bit for
    bit) and the avx512bf16 GEMM (within one bf16 rounding): the same comparison the forked child
    makes against the hardware tiles."""
    assert _cpu._amx_selfcheck_reference() == 0


@not_emulating
@needs_emulation
def test_selfcheck_child_that_dies_is_reported_not_fatal():
    """The self-check runs the tile instructions in a forked child. Where the CPU has no tiles the
    child dies with SIGILL -- exactly what an unpermitted or faulty tile path does -- and the parent
    reports it and goes on; where the tiles are usable it agrees ('')."""
    flags = _cpu_flags()
    answer = _cpu._amx_selfcheck_forked()
    if HARDWARE:
        assert answer == ""
    elif flags is not None and "amx_tile" not in flags:
        assert answer.startswith("the self-check died with") and "(signal 4)" in answer, answer
    else:
        pytest.skip(f"the CPU reports AMX tiles that are not usable here ({STATUS['status']}); the forked "
                    f"self-check answered {answer!r}")
    assert _cpu.amx_status() == STATUS  # asked once: the status does not change


# M: one tile of 16 + 1, an odd count of 16-row tiles (a chunk's last 16 alone), 100 (7 tiles, rows
# padded); N: one output, a partial panel, several panels; K: 1, odd, one block, across 512-k blocks
BF16_SHAPES = [(17, 1, 1), (31, 33, 31), (40, 40, 64), (48, 70, 100), (100, 65, 1030), (20, 32, 1536)]


@needs_emulation
@pytest.mark.parametrize("M,N,K", BF16_SHAPES)
def test_bf16_gemm_on_emulated_tiles_matches_the_reference(emulated, M, N, K):
    g = torch.Generator().manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K + 5, generator=g).bfloat16()[:, :K]  # a row stride past K
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    be = CpuBackend(quant_route="fp32")
    be.set_simd("amx")
    assert be.simd() == "amx" and be.info()["amx"] == STATUS["status"]
    y = be.linear(x, be.prepare_linear(w, torch.bfloat16), b)
    y_ref = REFERENCE.linear(x, REFERENCE.prepare_linear(w, torch.bfloat16), b)
    assert relative_error(y, y_ref) <= budget("linear", torch.bfloat16, K), (M, N, K)
    be.set_simd("avx512bf16")
    y_other = be.linear(x, be.prepare_linear(w, torch.bfloat16), b)
    # the same k-pair sums in fp32, in k-blocks of another length: equal to fp32 rounding, then bf16's
    assert relative_error(y, y_other) <= 4e-3, (M, N, K)


@needs_emulation
@pytest.mark.parametrize("threads", [2, 3])
def test_bf16_gemm_on_emulated_tiles_does_not_depend_on_threads(emulated, threads):
    """Rows are chunked across threads when there are few panels; every output's sum runs in the
    same order however the tasks fall."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(96, 200, generator=g).bfloat16(), torch.randn(40, 200, generator=g).bfloat16()
    be = CpuBackend(quant_route="fp32")
    default_threads = be.num_threads()
    be.set_simd("amx")
    wp = be.prepare_linear(w, torch.bfloat16)
    be.set_num_threads(1)
    y1 = be.linear(x, wp, None)
    be.set_num_threads(threads)
    try:
        assert torch.equal(be.linear(x, wp, None), y1)
    finally:
        be.set_num_threads(default_threads)


@needs_emulation
@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_panels_on_emulated_tiles_equal_avx512vnni(emulated, fmt):
    """Every block format, rows of x from 1 through 15 a panel call (the VNNI kernel, 8 rows a call)
    to 16 a call (tiles: 16, 32, 48 rows): the same bits as the avx512vnni path."""
    _cpu.set_int8_prefill(True)
    K = 512 if fmt.endswith("_k") else 160
    g = torch.Generator().manual_seed(len(fmt) + K)
    w = quant.quantize(torch.randn(37, K, generator=g) / math.sqrt(K), fmt)
    b = torch.randn(37, generator=g)
    be = CpuBackend(quant_route="int8")
    wp = be.prepare_linear(w, torch.float32)
    for M in (1, 3, 9, 13, 16, 17, 32, 40, 48):
        x = torch.randn(M, K, generator=g)
        out = {}
        for path in ("amx", "avx512vnni"):
            be.set_int8_path(path)
            assert be.int8_path() == path
            out[path] = be.linear(x, wp, b)
        assert torch.equal(out["amx"], out["avx512vnni"]), (fmt, M)
        y_ref = REFERENCE.linear(x, REFERENCE.prepare_linear(w, torch.float32), b)
        assert relative_error(out["amx"], y_ref) <= 3e-2, (fmt, M)  # int8 activations: a sanity bound


@pytest.mark.skipif(not HARDWARE, reason=f"the hardware tiles are not usable here (AMX: {STATUS['status']})")
def test_hardware_tiles_equal_the_software_tile_unit():
    """Where the tiles are usable: the instructions against their emulation on the same kernels --
    the int8 panels bit for bit, the bf16 GEMM to fp32 rounding (the order of a tile's sums is the
    hardware's own)."""
    g = torch.Generator().manual_seed(11)
    be = CpuBackend(quant_route="int8")
    _cpu.set_int8_prefill(True)
    try:
        for fmt in FORMATS:
            K = 512
            w = quant.quantize(torch.randn(70, K, generator=g) / math.sqrt(K), fmt)
            x = torch.randn(48, K, generator=g)  # panel calls of 16 rows: tiles
            wp = be.prepare_linear(w, torch.float32)
            be.set_int8_path("amx")
            y_hw = be.linear(x, wp, None)
            _cpu.set_amx_emulation(True)
            y_emu = be.linear(x, wp, None)
            _cpu.set_amx_emulation(False)
            assert torch.equal(y_hw, y_emu), fmt
        be32 = CpuBackend(quant_route="fp32")
        be32.set_simd("amx")
        x, w = torch.randn(100, 1030, generator=g).bfloat16(), torch.randn(65, 1030, generator=g).bfloat16()
        wp = be32.prepare_linear(w, torch.bfloat16)
        y_hw = be32.linear(x, wp, None)
        _cpu.set_amx_emulation(True)
        y_emu = be32.linear(x, wp, None)
        assert relative_error(y_hw, y_emu) <= 4e-3
        y_ref = REFERENCE.linear(x, REFERENCE.prepare_linear(w, torch.bfloat16), None)
        assert relative_error(y_hw, y_ref) <= budget("linear", torch.bfloat16, 1030)
    finally:
        _cpu.set_amx_emulation(False)
        _cpu.set_int8_prefill(False)
        CpuBackend.set_simd(CpuBackend.simd_paths()[0])
