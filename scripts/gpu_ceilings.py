"""Measured ceilings of the GPU the benchmarks run on (scripts/gpu_check.sh prints them first):
device-to-device copy bandwidth (bytes read + written), and torch.mm rates for bf16 and float32
(TF32 off, as the kernels' float32 paths) on random data. Median of CUDA-event-timed repeats
after a warm-up."""

from __future__ import annotations

import torch


def _median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    copy_bandwidth(2 * 2**30)
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.bfloat16, torch.float32):
        mm_rate(8192, dtype)


def copy_bandwidth(nbytes: int) -> None:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    print(f"copy {nbytes / 2**30:.0f} GiB: {ms:.3f} ms = {2 * nbytes / ms / 1e6:.0f} GB/s (read + write)")


def mm_rate(n: int, dtype: torch.dtype) -> None:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = _median_ms(lambda: a @ b, reps=10)
    print(f"mm {n}^3 {str(dtype).replace('torch.', '')}: {ms:.3f} ms = {2 * n**3 / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
