"""The package's figures are drawn here: :func:`figure` (a matplotlib figure on its own Agg canvas: no
pyplot state, no change of the caller's backend; every plot of fqgan uses it) and the kernels' picture,
:func:`speedup_chart`: speed-up over the reference per op, one bar per provider, on a log scale with the 1x
line drawn. The benchmark suite's summary (``benchmarks/summary.py``) and ``fqgan demo``'s report both draw
it from their own figures.

    from fqgan.eval.charts import speedup_chart
    speedup_chart([{"label": "nearest_code N=4096 peaked",
                    "speedups": {"fused cpu": 61.0, "torch.compile": 3.1, "faiss IndexFlatL2": 45.0}}],
                  "speedup.png", title="CPU, 2 threads")
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["figure", "speedup_chart"]

# one colour per provider, the same in every chart; providers not named here take the next free one
_COLOURS = {"fused cpu": "#d62728", "cuda": "#d62728", "triton": "#ff7f0e", "fused (auto)": "#d62728",
            "fused": "#d62728", "torch.compile": "#1f77b4"}
_OTHERS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def figure(figsize: tuple[float, float]):
    """A :class:`matplotlib.figure.Figure` with an Agg canvas (``fig.savefig`` writes PNGs). The object API:
    unlike ``pyplot``, it keeps no global state to close and leaves the caller's backend (a notebook's) as
    it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def speedup_chart(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Draws a horizontal grouped bar chart of speed-ups over the reference and saves it as a PNG.

    :param rows: one dict per op and shape, top to bottom: ``{"label": str, "speedups": {provider:
        float}}``, where a speed-up is reference time / provider time (> 1: faster than the
        reference). Non-positive or missing values are left out; a row without any is drawn empty.
    :param path: the PNG to write (its folder is created).
    :param title: the chart's title (e.g. the machine); a default one otherwise.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    providers: list[str] = []
    for row in rows:
        for name, value in row.get("speedups", {}).items():
            if name not in providers and isinstance(value, (int, float)) and value > 0:
                providers.append(name)
    colours, spare = {}, iter(_OTHERS * (1 + len(providers) // len(_OTHERS)))
    for name in providers:
        colours[name] = _COLOURS.get(name) or next(spare)

    n_rows, n_bars = len(rows), max(1, len(providers))
    height = 0.8 / n_bars
    bars = []  # (y, value, provider)
    for i, row in enumerate(rows):
        speedups = row.get("speedups", {})
        present = [(p, speedups[p]) for p in providers if isinstance(speedups.get(p), (int, float)) and speedups[p] > 0]
        for j, (name, value) in enumerate(present):
            bars.append((i + (j - (len(present) - 1) / 2) * height, float(value), name))
    values = [v for _, v, _ in bars]
    low, high = min([*values, 1.0]) / 2, max([*values, 1.0]) * 4
    fig = figure((10, 1.6 + 0.22 * n_bars * max(1, n_rows)))
    ax = fig.subplots()
    for y, value, name in bars:  # from the left edge: a log axis has no 0
        ax.barh(y, value - low, left=low, height=height * 0.9, color=colours[name])
        ax.text(value, y, f" {value:.3g}x", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", linewidth=1.0)
    ax.text(1.0, -0.6, " 1x = reference", fontsize=8, va="center")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(r.get("label", "")) for r in rows], fontsize=8)
    ax.set_ylim(n_rows - 0.5, -1.0)
    ax.set_xlabel("speed-up over the reference (reference time / provider time, log scale)")
    ax.set_title(title or "speed-up over the reference", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.25)
    handles = [Rectangle((0, 0), 1, 1, color=colours[p]) for p in providers]
    if handles:
        ax.legend(handles, providers, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
