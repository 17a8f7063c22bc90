"""sample (fused CFG + temperature + top-k/top-p + inverse-CDF draw) against reference.sample, draw for
draw given the same uniform numbers: cpu backend on B = 64 rows over V in {1, 7, 1000, 16384}, all
temperatures / top-k / top-p of the issue, with and without CFG, fp32/bf16/fp16 logits (bf16 has many
exact ties); constructed ties at the k-th value and at the top-p crossing; per-row parameters;
generator reproducibility; a chi-square goodness-of-fit test; triton under the interpreter on tiny
shapes; opcheck; torch.compile(fullgraph=True); bad input.

Exactness: the kernels decide the top-p set and the draw with their own float32 exps and float64
sums, the reference with torch's softmax and cumsum. Both are exact in real arithmetic, so they can
only disagree where a decision sits within rounding of its threshold; ``assert_same_draws`` allows a
mismatch only on such rows (checked in float64) and only on a small fraction of them.
"""


import pytest
import torch

import fqgan_kernels as fk
from fqgan_kernels import reference as ref
from fqgan_kernels.sample import _sample_op

B = 64
VOCABS = [1, 7, 1000, 16384]  # 1, odd, the real V = 16384
TEMPERATURES = [0.5, 1.0, 2.0]
TOP_PS = [0.5, 0.9, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON_VOCABS = [1, 7, 256, 300]  # interpreter tile = 256: one tile, a tile edge, two tiles
MAX_NEAR_BOUNDARY = 0.02  # fraction of rows whose decision may sit within rounding of a threshold
BOUNDARY_RTOL = 1e-5


def top_ks(V):
    return sorted({0, 1, 5, V})


def make_logits(Bn, V, dtype, cfg: bool, scale=3.0):
    cond = (torch.randn(Bn, V) * scale).to(dtype)
    uncond = (torch.randn(Bn, V) * scale).to(dtype) if cfg else None
    return cond, uncond


def near_boundary(cond, uncond, cfg_scale, temperature, top_k, top_p, u) -> torch.Tensor:
    """Rows whose top-p crossing or inverse-CDF draw sits within BOUNDARY_RTOL of its threshold,
    computed in float64 from the float32 guided logits (the same ones both sides filter)."""
    x = ref.guided_logits(cond, uncond, cfg_scale, temperature).double()
    V = x.shape[-1]
    if top_k > 0:
        kth = torch.topk(x, min(top_k, V), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    near = torch.zeros(x.shape[0], dtype=torch.bool)
    if top_p < 1.0:
        s, order = torch.sort(x, descending=True, dim=-1, stable=True)
        cum = s.softmax(-1).cumsum(-1)
        near |= ((cum - top_p).abs() < BOUNDARY_RTOL).any(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)
    near |= ((cdf - u.double().reshape(-1, 1)).abs() < BOUNDARY_RTOL).any(-1)
    return near


def assert_same_draws(got, want, near_args, what=""):
    """Equal draws, except on rows whose decision sits within rounding of its threshold
    (``near_boundary(*near_args)``, evaluated only when some draw differs), and those must be rare."""
    bad = got != want
    if not bad.any():
        return
    near = near_boundary(*near_args)
    assert not (bad & ~near).any(), (
        f"{what}: {int(bad.sum())} of {got.numel()} draws differ, rows {bad.nonzero().flatten().tolist()[:8]}: "
        f"got {got[bad][:8].tolist()} want {want[bad][:8].tolist()}")
    assert near.float().mean() <= MAX_NEAR_BOUNDARY, f"{what}: too many near-boundary rows ({int(near.sum())})"


def grid(V, temperatures=TEMPERATURES, top_ps=TOP_PS, ks=None):
    """All (temperature, top_k, top_p) of the issue; at the real V a covering subset (every value of
    each parameter, every filter combination) to keep the test fast."""
    ks = top_ks(V) if ks is None else ks
    full = [(t, k, p) for t in temperatures for k in ks for p in top_ps]
    if V < 4096:
        return full
    return [c for i, c in enumerate(full) if i % 4 == 0] + [(1.0, 5, 0.9), (2.0, V, 0.5), (0.5, 0, 0.5)]


def check_backend(backend, V, dtype, cfg, Bn=B, **grid_kw):
    cond, uncond = make_logits(Bn, V, dtype, cfg)
    cfg_scale = 1.75 if cfg else 1.0
    for temperature, top_k, top_p in grid(V, **grid_kw):
        u = torch.rand(Bn, dtype=torch.float64)
        want = ref.sample(cond, uncond, cfg_scale, temperature, top_k, top_p, uniform=u)
        got = fk.sample(cond, uncond, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                        top_p=top_p, uniform=u, backend=backend)
        assert got.dtype == torch.long and got.shape == (Bn,)
        assert_same_draws(got, want,
                          (cond, uncond, cfg_scale, temperature, top_k, top_p, u),
                          f"{backend} V={V} {dtype} cfg={cfg} T={temperature} k={top_k} p={top_p}")


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_cpu_draw_for_draw(V, dtype, cfg):
    check_backend("cpu", V, dtype, cfg)


@pytest.mark.parametrize("V, cfg, dtype", [(7, False, torch.float32), (300, True, torch.bfloat16)])
def test_triton_draw_for_draw(V, cfg, dtype, triton_available):
    """The interpreter is slow: 2 rows, one tile (V = 7) and two tiles with an edge (V = 300 > 256)."""
    check_backend("triton", V, dtype, cfg, Bn=2, temperatures=[0.5], top_ps=[0.5, 1.0], ks=[0, 5])


try:  # the Triton sampler's key, applied elementwise (module level: @triton.jit resolves globals)
    import triton
    import triton.language as tl

    from fqgan_kernels.triton.sample import _key

    @triton.jit
    def _keys_kernel(X, OUT, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(OUT + offs, _key(x).to(tl.int64), mask=offs < n)
except ImportError:
    _keys_kernel = None


def test_triton_key_orders_like_the_floats(triton_available):
    """The Triton sampler's uint32 key (top-k / top-p radix descents) is strictly increasing in the
    float value over the whole range: -inf, -max, negative normals and subnormals, -0 and +0 (one key
    apart; pass 1 turns -0 into +0 before any key is taken), positive subnormals and normals, +inf;
    and equals the int64 key it replaced."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([float("-inf"), -3.4e38, -2.0, -1.0, -tiny, -1e-45, -0.0, 0.0, 1e-45, tiny, 1.0, 2.0,
                      3.4e38, float("inf")], dtype=torch.float32)
    x = torch.cat([x, torch.randn(50).sort().values * 10])
    x = x.sort(stable=True).values  # -0.0 before +0.0 keep their order (they compare equal)
    out = torch.empty(x.numel(), dtype=torch.int64)
    _keys_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert out.min() >= 0 and out.max() < 2**32
    bits = x.view(torch.int32).long()
    want = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # the int64 key it replaced
    assert torch.equal(out, want)
    assert (out.diff() >= 0).all() and ((out.diff() > 0) | (x.diff() == 0)).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("V", VOCABS)
def test_cuda_matches_cpu(backend, V):
    """On the GPU: the same draws as the CPU kernel (same algorithm) for CUDA tensors."""
    for dtype in DTYPES:
        cond, uncond = make_logits(B, V, dtype, True)
        for top_k, top_p in [(0, 1.0), (5, 0.9), (0, 0.5), (V, 0.9)]:
            u = torch.rand(B, dtype=torch.float64)
            want = fk.sample(cond, uncond, cfg_scale=1.5, temperature=0.9, top_k=top_k, top_p=top_p, uniform=u,
                             backend="cpu")
            got = fk.sample(cond.cuda(), uncond.cuda(), cfg_scale=1.5, temperature=0.9, top_k=top_k, top_p=top_p,
                            uniform=u.cuda(), backend=backend).cpu()
            assert_same_draws(got, want, (cond, uncond, 1.5, 0.9, top_k, top_p, u),
                              f"{backend} V={V} {dtype} k={top_k} p={top_p}")


def tied_logits(Bn, V, levels=6):
    """Integer logits in [0, levels): every value is tied many times."""
    return torch.randint(0, levels, (Bn, V)).float()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ties_at_kth_and_at_top_p(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_available")
    Bn, V = (64, 1000) if backend == "cpu" else (2, 40)
    cond = tied_logits(Bn, V)
    cases = [(k, p) for k in (1, 3, 5, 17) for p in (0.3, 0.5, 0.9, 1.0)] if backend == "cpu" else [(5, 0.5)]
    for top_k, top_p in cases:
        u = torch.rand(Bn, dtype=torch.float64)
        want = ref.sample(cond, None, 1.0, 1.0, top_k, top_p, uniform=u)
        got = fk.sample(cond, top_k=top_k, top_p=top_p, uniform=u, backend=backend)
        assert_same_draws(got, want, (cond, None, 1.0, 1.0, top_k, top_p, u),
                          f"ties k={top_k} p={top_p}")
    # ties at the k-th are all kept: with 3 tokens at the max and k = 1, each of the 3 is drawn
    row = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    drawn = {int(fk.sample(row, top_k=1, uniform=torch.tensor([u]), backend=backend)) for u in (0.1, 0.5, 0.9)}
    assert drawn == {1, 3, 4}
    # exact top-p ties: 4 tokens of mass 1/4; cum = .25 .5 .75 1 > 0.5 removes from the 4th on
    row = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    drawn = {int(fk.sample(row, top_p=0.5, uniform=torch.tensor([u]), backend=backend)) for u in (0.1, 0.5, 0.9)}
    assert drawn == {0, 1, 2}
    assert drawn == {int(ref.sample(row, top_p=0.5, uniform=torch.tensor([u]))) for u in (0.1, 0.5, 0.9)}


def test_per_row_parameters():
    V = 257
    cond, uncond = make_logits(B, V, torch.float32, True)
    cfg = torch.rand(B) * 3
    temperature = torch.rand(B) * 1.5 + 0.25
    top_k = torch.randint(0, 20, (B,))
    top_p = torch.rand(B) * 0.9 + 0.1
    top_p[::4] = 1.0
    u = torch.rand(B, dtype=torch.float64)
    got = fk.sample(cond, uncond, cfg_scale=cfg, temperature=temperature, top_k=top_k, top_p=top_p, uniform=u,
                    backend="cpu")
    for b in range(B):
        args = (cond[b:b + 1], uncond[b:b + 1], float(cfg[b]), float(temperature[b]), int(top_k[b]), float(top_p[b]))
        want = ref.sample(*args, uniform=u[b:b + 1])
        if int(got[b]) != int(want):
            assert near_boundary(*args, u[b:b + 1]).all(), f"row {b}"
    # the reference backend (one reference call per row) agrees too
    assert torch.equal(fk.sample(cond[:8], uncond[:8], cfg_scale=cfg[:8], temperature=temperature[:8],
                                 top_k=top_k[:8], top_p=top_p[:8], uniform=u[:8], backend="reference"), got[:8])


def test_generator_reproducible():
    cond, uncond = make_logits(B, 1000, torch.float32, True)
    kw = dict(cfg_scale=2.0, temperature=1.0, top_k=50, top_p=0.9)
    a = fk.sample(cond, uncond, **kw, generator=torch.Generator().manual_seed(7), backend="cpu")
    b = fk.sample(cond, uncond, **kw, generator=torch.Generator().manual_seed(7), backend="cpu")
    c = ref.sample(cond, uncond, 2.0, 1.0, 50, 0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_chi_square():
    """Many draws of one distribution (fixed seed, so deterministic) against the reference's
    probabilities: p-value of Pearson's statistic must exceed 1e-4 (the Triton kernel runs the same
    algorithm and is checked draw for draw; the interpreter is too slow for 40000 draws)."""
    backend = "cpu"
    n = 40000
    V = 50
    gen = torch.Generator().manual_seed(1234)
    cond = torch.randn(1, V, generator=gen) * 2
    uncond = torch.randn(1, V, generator=gen) * 2
    kw = dict(cfg_scale=1.5, temperature=1.3, top_k=30, top_p=0.9)
    probs = ref.top_k_top_p_filter(ref.guided_logits(cond, uncond, 1.5, 1.3), 30, 0.9).softmax(-1).double()[0]
    tokens = fk.sample(cond.expand(n, V), uncond.expand(n, V), **kw, generator=gen, backend=backend)
    counts = torch.bincount(tokens, minlength=V).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "drew a filtered token"
    expected = probs[kept] * n
    stat = ((counts[kept] - expected) ** 2 / expected).sum()
    df = int(kept.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))
    assert p_value > 1e-4, f"chi2 = {float(stat):.1f} with {df} dof, p = {p_value:.2e}"
    # and it is meaningful: a wrong distribution (guidance 1.0 instead of 1.5) is rejected
    wrong = ref.top_k_top_p_filter(ref.guided_logits(cond, uncond, 1.0, 1.3), 30, 0.9).softmax(-1).double()[0]
    e2 = wrong[kept] / wrong[kept].sum() * n
    stat2 = ((counts[kept] - e2) ** 2 / e2).sum()
    assert float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat2 / 2)) < 1e-4


def test_sample_from_hidden():
    Bn, H, V = 8, 32, 301
    hc, hu = torch.randn(Bn, H), torch.randn(Bn, H)
    w, bias = torch.randn(V, H) * 0.3, torch.randn(V)
    u = torch.rand(Bn, dtype=torch.float64)
    kw = dict(cfg_scale=2.0, temperature=0.8, top_k=40, top_p=0.9, uniform=u, backend="cpu")
    got = fk.sample_from_hidden(hc, hu, w, bias, **kw)
    want = fk.sample(torch.nn.functional.linear(hc, w, bias), torch.nn.functional.linear(hu, w, bias), **kw)
    assert torch.equal(got, want)
    assert fk.sample_from_hidden(hc, None, w, **kw).shape == (Bn,)


def test_float64_and_empty_batch():
    cond = torch.randn(5, 33, dtype=torch.float64)
    u = torch.rand(5, dtype=torch.float64)
    assert torch.equal(fk.sample(cond, top_k=4, uniform=u, backend="cpu"), ref.sample(cond, top_k=4, uniform=u))
    assert fk.sample(torch.randn(0, 9), backend="cpu").shape == (0,)


def _op_args(V=37, cfg=True, Bn=3):
    cond = torch.randn(Bn, V)
    return (cond, torch.randn(Bn, V) if cfg else None, torch.full((Bn,), 1.5), torch.full((Bn,), 0.8),
            torch.tensor([0, 5, 40][:Bn]), torch.tensor([1.0, 0.9, 0.5][:Bn]), torch.rand(Bn, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_opcheck(backend, cfg, request):
    args = _op_args(cfg=cfg)
    if backend == "triton":
        request.getfixturevalue("triton_available")
        args = _op_args(V=7, cfg=cfg, Bn=1)  # the interpreter is slow
    torch.library.opcheck(_sample_op, (*args, backend))


def test_torch_compile_fullgraph():
    cond, uncond = make_logits(8, 300, torch.float32, True)
    u = torch.rand(8, dtype=torch.float64)

    def step(c, un, uu):
        return fk.sample(c, un, cfg_scale=2.0, temperature=0.9, top_k=20, top_p=0.8, uniform=uu, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(cond, uncond, u), step(cond, uncond, u))
    compiled_rand = torch.compile(lambda c: fk.sample(c, top_p=0.9, backend="cpu"), fullgraph=True, backend="eager")
    assert compiled_rand(cond).shape == (8,)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=-0.1), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(cfg_scale=float("nan")), ValueError, "cfg_scale"),
    (dict(top_p=torch.tensor([0.5, 0.0, 0.9, 1.0])), ValueError, "top_p"),
    (dict(top_k=torch.tensor([1, -2, 0, 3])), ValueError, "top_k"),
    (dict(top_k=torch.tensor([1.0, 2.0, 0.0, 3.0])), TypeError, "top_k"),
    (dict(temperature=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "temperature"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature"),
    (dict(uniform=torch.rand(5)), ValueError, "uniform"),
    (dict(uniform=torch.tensor([0.1, 0.2, 1.0, 0.3])), ValueError, "uniform"),
    (dict(uniform=torch.tensor([1, 2, 3, 4])), TypeError, "uniform"),
    (dict(uncond_logits=torch.randn(4, 11)), ValueError, "uncond_logits"),
    (dict(uncond_logits=torch.randn(4, 10, dtype=torch.float16)), TypeError, "uncond_logits"),
    (dict(generator=3), TypeError, "generator"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input(kwargs, exc, match):
    cond = torch.randn(4, 10)
    uncond = kwargs.pop("uncond_logits", None)
    with pytest.raises(exc, match=match):
        fk.sample(cond, uncond, **kwargs)


@pytest.mark.parametrize("cond, exc, match", [
    (torch.randn(10), ValueError, "cond_logits"),
    (torch.randint(0, 5, (4, 10)), TypeError, "cond_logits"),
    (torch.randn(4, 0), ValueError, "V = 0"),
    ([[1.0, 2.0]], TypeError, "cond_logits"),
])
def test_bad_logits(cond, exc, match):
    with pytest.raises(exc, match=match):
        fk.sample(cond)


def test_scalar_and_per_row_parameters_agree():
    """A python scalar is the same parameter as a [B] tensor of it (draw for draw); a bad per-row value
    is named with its row."""
    cond, uncond = make_logits(8, 100, torch.float32, True)
    u = torch.rand(8, dtype=torch.float64)
    a = fk.sample(cond, uncond, cfg_scale=1.5, temperature=0.7, top_k=20, top_p=0.8, uniform=u)
    b = fk.sample(cond, uncond, cfg_scale=torch.full((8,), 1.5), temperature=torch.full((8,), 0.7),
                  top_k=torch.full((8,), 20), top_p=torch.full((8,), 0.8), uniform=u)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; row 2 has 1.5"):
        fk.sample(cond, top_p=torch.tensor([0.5, 0.5, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5]))


# -- non-finite logits: one rule on every backend (fqgan_kernels/sample.py, reference.sample) ------------
INF = float("inf")
NONFINITE_BACKENDS = ["reference", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]
KERNEL_BACKENDS = NONFINITE_BACKENDS[1:]


def _device(backend) -> str:
    """Where a backend's inputs live: CUDA tensors for cuda, and for triton unless the interpreter
    runs it on CPU tensors (TRITON_INTERPRET=1, set by conftest.py on GPU-less machines)."""
    from fqgan_kernels._backend import triton_interpret

    return "cuda" if backend == "cuda" or (backend == "triton" and not triton_interpret()) else "cpu"


def draw(backend, cond, uncond=None, uniform=None, **kw):
    """fk.sample on the backend's device; the tokens come back on the CPU."""
    dev = _device(backend)
    return fk.sample(cond.to(dev), None if uncond is None else uncond.to(dev),
                     uniform=None if uniform is None else uniform.to(dev), backend=backend, **kw).cpu()


def raw_draw(backend, cond, uncond=None, cfg_scale=1.0, top_k=0, top_p=1.0, uniform=None):
    """The kernel itself (no front-door checks): -1 marks a row with nothing to draw."""
    dev = _device(backend)
    Bn = cond.shape[0]
    u = torch.rand(Bn, dtype=torch.float64) if uniform is None else uniform

    def full(v, dt):
        return torch.full((Bn,), v, dtype=dt, device=dev)

    return _sample_op(cond.to(dev), None if uncond is None else uncond.to(dev), full(cfg_scale, torch.float32),
                      full(1.0, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32), u.to(dev),
                      backend).cpu()


def ref_rows(cond, uncond, cfg_scale, top_k, top_p, u):
    """reference.sample row by row (it raises on a row with nothing to draw, so the rows go one at a time)."""
    return torch.stack([ref.sample(cond[b:b + 1], None if uncond is None else uncond[b:b + 1], cfg_scale, 1.0,
                                   top_k, top_p, uniform=u[b:b + 1])[0] for b in range(cond.shape[0])])


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_nan_logits_are_an_error(backend):
    if _device(backend) != "cpu":
        pytest.skip("on CUDA tensors the NaN check is a device-side assert (no sync): it would end the process")
    with pytest.raises(ValueError, match="NaN"):
        fk.sample(torch.full((2, 10), float("nan")), backend=backend)
    cond = torch.randn(3, 10)
    uncond = cond.clone()
    uncond[1, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fk.sample(cond, uncond, cfg_scale=2.0, backend=backend)


def test_nan_message_names_the_rows():
    cond = torch.randn(3, 10)
    uncond = cond.clone()
    uncond[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"uncond_logits holds NaN in 1 of 3 rows; first at row 1"):
        fk.sample(cond, uncond, cfg_scale=2.0)


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_posinf_is_always_this_token(backend):
    """+inf means "always this token" (several: uniform among them), whatever u, top-k, top-p and
    temperature say; torch.softmax would give NaN there."""
    u = torch.tensor([0.0, 0.3, 0.7, 0.999], dtype=torch.float64)
    one = torch.tensor([[0.0, INF, 0.0]]).expand(4, 3)
    for kw in ({}, {"top_k": 1}, {"top_k": 2}, {"top_p": 0.5}, {"temperature": 0.5}):
        assert draw(backend, one, uniform=u, **kw).tolist() == [1, 1, 1, 1], kw
    two = torch.tensor([[INF, 0.0, INF, 5.0]]).expand(4, 4)
    assert draw(backend, two, uniform=u).tolist() == [0, 0, 2, 2]
    # guidance: +inf in cond with a finite uncond stays +inf for cfg > 0
    cond, uncond = torch.zeros(4, 5), torch.randn(4, 5)
    cond[:, 3] = INF
    assert draw(backend, cond, uncond, cfg_scale=2.0, uniform=u).tolist() == [3, 3, 3, 3]
    # a temperature that overflows a finite logit to +inf follows the same rule as the reference
    big = torch.tensor([[3e38, 0.0, 1.0]]).expand(4, 3)
    assert draw(backend, big, temperature=0.5, uniform=u).tolist() == [0, 0, 0, 0]
    # several +inf tokens over two Triton tiles (interpreter tile = 256): number floor(u * count)
    wide = torch.randn(4, 300)
    wide[:, [5, 250, 256, 299]] = INF
    assert draw(backend, wide, uniform=u, top_k=3, top_p=0.5).tolist() == [5, 250, 256, 299]


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_masked_in_both_halves_stays_masked(backend):
    """-inf in cond and uncond at the same token: guided -inf (not -inf - -inf = NaN), never drawn;
    the draws equal the reference's on the other tokens."""
    Bn = 8 if backend == "triton" else 64  # the interpreter is slow
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(Bn, 40, generator=g), torch.randn(Bn, 40, generator=g)
    mask = torch.rand(Bn, 40, generator=g) < 0.5
    mask[:, 0] = False
    cond[mask] = -INF
    uncond[mask] = -INF
    u = torch.rand(Bn, dtype=torch.float64, generator=g)
    got = draw(backend, cond, uncond, cfg_scale=3.0, top_k=10, top_p=0.9, uniform=u)
    assert not mask.gather(1, got[:, None]).any()
    assert torch.equal(got, ref_rows(cond, uncond, 3.0, 10, 0.9, u))
    # no filter, and a top-k larger than the tokens left unmasked
    for top_k, top_p in ((0, 1.0), (30, 1.0)):
        got = draw(backend, cond, uncond, cfg_scale=3.0, top_k=top_k, top_p=top_p, uniform=u)
        assert not mask.gather(1, got[:, None]).any(), (top_k, top_p)
        assert torch.equal(got, ref_rows(cond, uncond, 3.0, top_k, top_p, u)), (top_k, top_p)


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_opposite_infinities_count_as_masked(backend):
    """cond = +inf, uncond = -inf (or the reverse) guides to -inf + inf = NaN, which counts as -inf:
    never drawn, whatever the sign of the NaN; +inf in both halves is +inf ("always this token")."""
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    cond[:, 1], uncond[:, 1] = INF, -INF
    cond[:, 7], uncond[:, 7] = -INF, INF
    cond[:, 12], uncond[:, 12] = INF, -INF
    u = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 0.999], dtype=torch.float64)
    for cfg_scale, top_k, top_p in ((2.0, 0, 1.0), (1.5, 4, 0.8)):
        got = draw(backend, cond, uncond, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p, uniform=u)
        assert not torch.isin(got, torch.tensor([1, 7, 12])).any(), (cfg_scale, top_k, top_p)
        assert torch.equal(got, ref_rows(cond, uncond, cfg_scale, top_k, top_p, u)), (cfg_scale, top_k, top_p)
    both = cond.clone(), uncond.clone()
    both[0][:, 15] = INF
    both[1][:, 15] = INF
    assert draw(backend, *both, cfg_scale=2.0, uniform=u).tolist() == [15] * 6
    # cfg = 0 with +inf in cond only: uncond + 0 * inf = NaN, masked as well (the reference agrees)
    zero = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    zero[0][:, 3] = INF
    got = draw(backend, *zero, cfg_scale=0.0, uniform=u)
    assert (got != 3).all() and torch.equal(got, ref_rows(*zero, 0.0, 0, 1.0, u))


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_row_without_drawable_token_is_an_error(backend):
    cond, uncond = torch.randn(3, 6), torch.randn(3, 6)
    cond[1] = -INF  # guided -inf everywhere with a finite uncond too
    cond[2, :3], uncond[2, :3] = INF, -INF  # opposite infinities: NaN, counts as -inf
    cond[2, 3:] = uncond[2, 3:] = -INF  # masked in both halves
    if backend != "reference":
        # the kernel marks such rows -1; the front door turns that into the error
        out = raw_draw(backend, cond)
        assert out[1] == -1 and out[0] >= 0 and out[2] >= 0
        out = raw_draw(backend, cond, uncond, cfg_scale=2.0, top_k=2, top_p=0.5)
        assert out[0] >= 0 and out[1:].tolist() == [-1, -1]
    if _device(backend) != "cpu":
        return  # on CUDA tensors that error is a device-side assert (no sync): it would end the process
    match = "row 1 has no token to draw"  # every backend names the row, the reference one too
    with pytest.raises(ValueError, match=match):
        fk.sample(cond, backend=backend)
    with pytest.raises(ValueError, match=match):
        fk.sample(cond, uncond, cfg_scale=2.0, backend=backend)
    with pytest.raises(ValueError, match=match):
        fk.sample(cond[[0, 2]], uncond[[0, 2]], cfg_scale=2.0, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_with_the_scan_off_is_never_drawn(backend):
    """With check_finite=False the kernel does not raise: a NaN logit counts as -inf (either sign of
    NaN, in cond or in uncond)."""
    Bn = 4 if backend == "triton" else 16
    cond, uncond = torch.randn(Bn, 9), torch.randn(Bn, 9)
    cond[:, 2] = float("nan")
    uncond[:, 5] = -float("nan")
    u = torch.rand(Bn, dtype=torch.float64)
    got = draw(backend, cond, uniform=u, check_finite=False)
    masked = cond.clone()
    masked[:, 2] = -INF
    assert (got != 2).all() and torch.equal(got, draw(backend, masked, uniform=u))
    got = draw(backend, cond, uncond, cfg_scale=2.0, uniform=u, check_finite=False)
    masked_u = uncond.clone()
    masked_u[:, 2] = -INF  # -inf in both halves at token 2: masked, as the NaN is
    masked_u[:, 5] = 0.0
    masked_c = masked.clone()
    masked_c[:, 5] = -INF  # any -inf guided at token 5
    assert not torch.isin(got, torch.tensor([2, 5])).any()
    assert torch.equal(got, ref_rows(masked_c, masked_u, 2.0, 0, 1.0, u))
