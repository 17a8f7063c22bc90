"""Peaked vs flat, interleaved: one provider's call on flat and on peaked inputs alternately, many
rounds, so that both see the same machine load; prints min and median per kind and their ratios.

The pytest benchmarks time all flat rounds of a case, then all peaked rounds; on a shared machine
whose load drifts within minutes that can move the ratio more than the kernels do. This script
reuses their inputs and calls (the bench_*.py modules) and only changes the order of the rounds.
It checks nothing; the pytest benchmarks check every result before they time it. It imports the
fqgan_kernels of the checkout it sits in.

    python benchmarks/ab_peaked_flat.py --rounds 5                   # every op, the fused kernels
    python benchmarks/ab_peaked_flat.py --ops entropy_loss --provider reference
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the bench modules, and the checkout's own fqgan_kernels

import bench_entropy_loss as be  # noqa: E402
import bench_linear_cross_entropy as bl  # noqa: E402
import bench_nearest_code as bn  # noqa: E402
import bench_quantizer as bq  # noqa: E402
import bench_sample as bs  # noqa: E402
from conftest import machine_line  # noqa: E402

import fqgan_kernels as fk  # noqa: E402
from fqgan_kernels import reference as ref  # noqa: E402

INPUTS = ("flat", "peaked")


def nearest_code(provider: str) -> list[tuple[str, Callable[[str], Callable[[], object]]]]:
    def make(shape):
        def factory(inputs):
            z, cb = bn.make_inputs(shape, inputs)
            if provider == "reference":
                return lambda: ref.nearest_code(z, cb, True)
            return lambda: fk.nearest_code(z, cb, True, backend=provider)
        return factory

    return [(f"nearest_code N={s[0]} K={s[1]} D={s[2]} k={s[3]}", make(s))
            for s in [(4096, 16384, 8, 3), (16384, 16384, 8, 3)]]


def entropy_loss(provider: str):
    def make(shape):
        def factory(inputs):
            z, cb = be.make_inputs(shape)
            t = be.TEMPERATURE[inputs]
            if provider == "reference":
                return be.step_fn(lambda a, b: ref.entropy_loss(a, b, t), z, cb)
            return be.step_fn(lambda a, b: fk.entropy_loss(a, b, t, backend=provider), z, cb)
        return factory

    return [(f"entropy_loss fwd+bwd N={s[0]} K={s[1]} D={s[2]} k={s[3]}", make(s)) for s in be.FULL_SHAPES]


def quantizer(provider: str):
    def make(tokens):
        def factory(inputs):
            return bq.make_step("fused" if provider != "reference" else "eager", tokens, inputs)[0]
        return factory

    return [(f"quantizer step N={n} K={bq.K_FULL} D={bq.D} k={bq.k}", make(n)) for n in bq.FULL_TOKENS]


def linear_cross_entropy(provider: str):
    def make(shape):
        def factory(inputs):
            h, w, t = bl.make_inputs(shape, inputs)
            if provider == "reference":
                return bl.make_step(lambda x, w_, t_: ref.linear_cross_entropy(x, w_, t_).loss, h, w, t)
            return bl.make_step(lambda x, w_, t_: fk.linear_cross_entropy(x, w_, t_, backend=provider).loss, h, w, t)
        return factory

    return [(f"linear_cross_entropy fwd+bwd {bl._id(s)}", make(s)) for s in bl.PAIRED_SHAPES]


def sample(provider: str):
    def make(shape, setting):
        def factory(inputs):
            steps = bs.make_inputs(shape, inputs)
            params = bs.SETTINGS[setting]
            if provider == "reference":
                return lambda: [ref.sample(c, un, *p, uniform=u) for (c, un, u), p in zip(steps, params)]
            fn = bs._fused(provider)
            return lambda: [fn(c, un, u, *p) for (c, un, u), p in zip(steps, params)]
        return factory

    return [(f"sample B={s[0]}x2 V={s[1]} {str(s[2]).split('.')[-1]} k={bs.K_STEPS} {st}", make(s, st))
            for s in bs.FULL_SHAPES for st in bs.SETTINGS]


OPS = {"nearest_code": nearest_code, "entropy_loss": entropy_loss, "quantizer": quantizer,
       "linear_cross_entropy": linear_cross_entropy, "sample": sample}


def interleaved(factory: Callable[[str], Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    calls = {kind: factory(kind) for kind in INPUTS}
    for kind in INPUTS:
        calls[kind]()  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in INPUTS}
    for r in range(rounds):
        for kind in INPUTS if r % 2 == 0 else INPUTS[::-1]:  # alternate which kind goes first
            t0 = time.perf_counter()
            calls[kind]()
            times[kind].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    parser.add_argument("--provider", default="cpu", help="cpu (the fused kernels) or reference")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--match", default="", help="only the cases whose name contains this")
    args = parser.parse_args()
    print(f"machine: {machine_line()}")
    lib = os.path.dirname(os.path.dirname(os.path.abspath(fk.__file__)))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"fqgan_kernels from {lib}, provider {args.provider}, {args.rounds} interleaved rounds, {when}")
    print(f"{'case':<58} {'flat min':>9} {'peak min':>9} {'min ratio':>9} {'med ratio':>9}  (ms)")
    for op in args.ops:
        for name, factory in OPS[op](args.provider):
            if args.match not in name:
                continue
            t = interleaved(factory, args.rounds)
            fmin, pmin = min(t["flat"]), min(t["peaked"])
            ratio_med = statistics.median(t["peaked"]) / statistics.median(t["flat"])
            print(f"{name:<58} {fmin * 1e3:>9.1f} {pmin * 1e3:>9.1f} {pmin / fmin:>8.2f}x {ratio_med:>8.2f}x",
                  flush=True)
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
