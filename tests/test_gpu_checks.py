"""The GPU-readiness checks that run without a GPU: the Triton compile check and the CUDA resource
check fail on kernels with known defects (tests/gpu_check_cases.py, a spilling .cu written here),
the occupancy / ptxas / cuobjdump helpers give known answers, every GPU benchmark row has a
roofline bound, and every Triton autotune key buckets the sizes that change between calls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

import gpu_resources as gr  # noqa: E402


def _env_without_interpreter() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the compile check needs real @triton.jit functions
    return env


# -- occupancy and parsers ------------------------------------------------------------------------
@pytest.mark.parametrize("regs,threads,smem,warps,limiter", [
    (32, 256, 0, 64, "-"),  # full occupancy
    (255, 128, 0, 8, "regs"),  # 255 regs -> 8192 per warp -> 8 warps
    (168, 128, 0, 12, "regs"),  # 168 * 32 = 5376 -> 12 warps -> 3 blocks of 4
    (64, 256, 0, 32, "regs"),
    (32, 128, 100 * 1024, 8, "smem"),  # (100 KiB + 1 KiB reserve) -> 2 blocks of 4 warps in 228 KiB
    (32, 64, 0, 64, "-"),  # 32 blocks of 2 warps
    (32, 32, 0, 32, "blocks"),  # at most 32 resident blocks
])
def test_occupancy_h200(regs, threads, smem, warps, limiter):
    occ = gr.occupancy(gr.SM90, regs, threads, smem)
    assert (occ.warps, occ.limiter) == (warps, limiter)


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelPf
    64 bytes stack frame, 72 bytes spill stores, 64 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16896 bytes smem
ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_80'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 364 bytes cmem[0]
"""


def test_parse_ptxas():
    a, b = gr.parse_ptxas(PTXAS_LOG)
    assert (a.kernel, a.arch, a.regs, a.stack, a.spill_stores, a.spill_loads, a.smem) == \
        ("_Z6kernelPf", "sm_90a", 255, 64, 72, 64, 16896)
    assert (b.arch, b.regs, b.stack, b.spill_stores, b.smem) == ("sm_80", 32, 0, 0, 0)


def test_parse_cuobjdump():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _nearest_code_fwd_kernel:
  REG:190 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert gr.parse_cuobjdump(text) == {"_nearest_code_fwd_kernel": {"REG": 190, "STACK": 0, "SHARED": 1024,
                                                                     "LOCAL": 0}}


# -- the Triton compile check fails on known defects ---------------------------------------------
def _cuobjdump_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(triton.knobs.nvidia.cuobjdump.path)


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs triton with its NVIDIA backend tools")
def test_triton_compile_check_fails_on_defects(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "check_triton_compile.py"), "--cases",
         os.path.join(ROOT, "tests", "gpu_check_cases.py"), "--jobs", "2", "--json", str(out)],
        cwd=ROOT, env=_env_without_interpreter(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    by = {(r["kernel"], r["arch"]): r for r in results}
    for arch in ("sm_90a", "sm_80"):
        spill = by[("_spill_kernel", arch)]
        assert spill["stack"] + spill["local"] > 0 and any(p.startswith("spills") for p in spill["problems"])
        smem = by[("_big_smem_kernel", arch)]
        assert smem["shared_dyn"] > gr.ARCHS[arch].smem_per_block
        assert any(p.startswith("shared memory") for p in smem["problems"]), smem
        bad_dot = by[("_small_k_dot_kernel", arch)]
        assert "error" in bad_dot and bad_dot["problems"][0].startswith("compile error")
        good = by[("_good_kernel", arch)]
        assert good["problems"] == [] and good["stack"] == 0 and good["regs"] > 0
    assert proc.stdout.count("FAIL  _spill_kernel [") == 2


# -- the CUDA resource check fails on a spilling kernel and on over-limit shared memory -----------
SPILL_CU = r"""
// 64 live floats per thread under a 32-register cap (1024 threads, 2 blocks per SM): ptxas spills.
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* __restrict__ x, float* y, int n) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = x[threadIdx.x + i * n];
  float s = 0.f;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int i = 0; i < 64; ++i) s = fmaf(s, v[i], v[(i * 7 + r) % 64]);
  y[threadIdx.x] = s;
}
"""
BIG_SMEM_CU = r"""
// 240 KB of static shared memory: more than any block may have (48 KB static, 227 KiB opt-in).
__global__ void big_smem_kernel(float* y) {
  __shared__ float buf[60000];
  buf[threadIdx.x] = 1.f;
  __syncthreads();
  y[threadIdx.x] = buf[59999 - threadIdx.x];
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_compile_check_fails_on_defects(tmp_path):
    spill, big = tmp_path / "spill.cu", tmp_path / "big_smem.cu"
    spill.write_text(SPILL_CU)
    big.write_text(BIG_SMEM_CU)
    for src, expect in ((spill, "spills (spill stores"), (big, "FAIL  ")):
        proc = subprocess.run(["bash", os.path.join(SCRIPTS, "check_cuda_compile.sh"), str(src)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert expect in proc.stdout, proc.stdout


# -- roofline ------------------------------------------------------------------------------------
def test_roofline_bounds_are_the_max_of_their_terms():
    import roofline as rl

    b = rl.fused_bound("nearest_code", (65536, 16384, 8, 3), "fp32")
    assert b.bytes == (2 * 65536 * 3 * 8 + 3 * 16384 * 8) * 4 + 8 * 65536 * 3
    assert b.flops == 2.0 * 65536 * 16384 * 8 * 3
    assert b.seconds == pytest.approx(b.flops / 67e12) and b.limiter == "FP32 FMA"
    s = rl.fused_bound("sample", (64, 16384), "bf16")
    assert s.seconds == pytest.approx(s.bytes / 4.8e12) and s.limiter == "HBM"
    lce = rl.fused_bound("linear_cross_entropy", (2, 32768, 1024, 16384), "bf16")
    assert lce.seconds == pytest.approx(6.0 * 2 * 32768 * 16384 * 1024 / (1979e12 / 2))


def test_roofline_reference_counts_the_n_by_k_matrix():
    import roofline as rl

    N, K, D, k = 4096, 2048, 8, 2
    ref = rl.reference_bound("nearest_code", (N, K, D, k), "fp32")
    # at least: write the N x K distances (mm), read them for the argmin, per sub-codebook
    assert ref.bytes >= 2 * 4 * N * K * k
    assert ref.flops == 2.0 * N * K * D * k


def test_roofline_covers_every_gpu_benchmark():
    """Every `cuda` benchmark row (collected, not run) has a roofline bound: a new GPU shape in
    benchmarks/ must be added to scripts/roofline.py SHAPES."""
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "roofline.py"), "--check-coverage"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _bench_entry(file: str, func: str, params: dict, ids: str, t_min: float) -> dict:
    """One benchmark as pytest-benchmark writes it to --benchmark-json (non-JSON params as strings)."""
    name = f"{func}[{ids}]"
    return {"group": file.split("_", 1)[1].removesuffix(".py"), "name": name,
            "fullname": f"benchmarks/{file}::{name}", "params": params,
            "stats": {"min": t_min, "median": 1.1 * t_min}, "extra_info": {"GFLOP/s": 1.0, "peak_extra_MiB": 3.0}}


def test_gpu_check_prints_measured_over_bound(tmp_path):
    """scripts/gpu_check.sh, with its GPU steps skipped and a fake benchmark JSON in $OUT, ends with
    the table to paste: per row measured min, the roofline bound of its composition and min / bound
    (a fused row, a reference row and a row with no bound)."""
    import roofline as rl

    f32 = "UNSERIALIZABLE[torch.float32]"
    fused = _bench_entry("bench_nearest_code.py", "test_gpu",
                         {"shape": [65536, 16384, 8, 3], "dtype": f32, "provider": "triton"},
                         "fp32-triton-N65536-K16384-D8-k3", 0.002)
    ref = _bench_entry("bench_sample.py", "test_reference_eager_cuda",
                       {"shape": [64, 16384, "UNSERIALIZABLE[torch.bfloat16]"], "setting": "topk+topp"},
                       "B64-V16384-bfloat16-topk+topp", 0.0005)
    cpu = _bench_entry("bench_nearest_code.py", "test_fused_cpu", {"shape": [4096, 1024, 8, 2]},
                       "N4096-K1024-D8-k2", 0.01)
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [fused, ref, cpu]}))
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUILD": "0", "GPU_CHECK_CEILINGS": "0",
           "GPU_CHECK_TESTS": "0", "GPU_CHECK_BENCH": "0", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("== benchmark table", 1)[1]
    rows = {cells[1]: cells for line in table.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert (tmp_path / "table.md").read_text().strip() == table.split("\n", 1)[1].strip()
    b = rl.fused_bound("nearest_code", (65536, 16384, 8, 3), "fp32")
    r = rl.reference_bound("sample", (64, 16384), "bf16")
    # columns: group, name, min ms, median ms, GFLOP/s, peak MiB, bound ms, min / bound, limited by
    assert rows[fused["name"]][2] == "2.000" and rows[fused["name"]][7] == f"{0.002 / b.seconds:.1f}x"
    assert rows[fused["name"]][8] == b.limiter == "FP32 FMA"
    assert rows[ref["name"]][7] == f"{0.0005 / r.seconds:.1f}x" and r.bytes > 64 * 16384 * 4 * 2
    assert rows[cpu["name"]][6:8] == ["-", "-"] and "no roofline row" in rows[cpu["name"]][8]


# -- Triton autotune keys ------------------------------------------------------------------------
def test_triton_autotune_keys_bucket_the_sizes_that_vary():
    pytest.importorskip("triton")
    from fqgan_kernels.triton import _launch, entropy_loss, linear_cross_entropy, nearest_code, sample, vq_losses

    tunings = [(nearest_code._nearest_code_fwd_kernel, nearest_code.FWD_TUNING),
               (sample._sample_kernel, sample.TUNING),
               (vq_losses._vq_losses_fwd_kernel, vq_losses.FWD_TUNING),
               (vq_losses._vq_losses_bwd_kernel, vq_losses.BWD_TUNING)]
    tunings += [(entropy_loss.KERNELS[name], t) for (name, _), t in entropy_loss.TUNING.items()]
    tunings += [(linear_cross_entropy.KERNELS[name], t) for (name, _), t in linear_cross_entropy.TUNING.items()]
    for kernel, tuning in tunings:
        names = kernel.arg_names
        assert set(tuning.key) <= set(names), (kernel, tuning.key)
        assert "N" not in tuning.key and "B" not in tuning.key, (kernel, tuning.key)
        assert {"N_BUCKET", "B_BUCKET"} & set(tuning.key), (kernel, tuning.key)
        assert tuning.all_configs()[: len(tuning.configs)] == list(tuning.configs)
    assert [_launch.pow2_bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    assert _launch.pow2_bucket(10**9) == _launch.BUCKET_CAP
