"""The report's plots: one PNG per quantity, every run that logged it overlaid, named in the legend.

matplotlib draws headless: a bare `Figure` renders with Agg, no display or pyplot state needed. The x
axis is training tokens (step × tokens per step) when every run says how many tokens a step takes,
else the optimizer step, and the axis label says which.
"""

from __future__ import annotations

import io

from chatforge.report.runs import Run

# file name -> (curve name, title, y label)
PLOTS = {
    "train_loss.png": ("loss", "Training loss", "loss (nats/token)"),
    "val_loss.png": ("eval_loss", "Validation loss", "loss (nats/token)"),
    "learning_rate.png": ("learning_rate", "Learning rate", "learning rate"),
    "tokens_per_s.png": ("tokens_per_s", "Training throughput", "tokens/s"),
}


def wanted(runs: list[Run]) -> list[str]:
    """The PNG files the report will hold: one per quantity that at least one run logged."""
    return [name for name, (curve, *_) in PLOTS.items() if any(run.curves.get(curve) for run in runs)]


def title(name: str) -> str:
    return PLOTS[name][1]


def x_axis(runs: list[Run]) -> str:
    """"tokens" when every run knows its tokens per step, else "step"."""
    return "tokens" if runs and all(run.tokens_per_step for run in runs) else "step"


def render(runs: list[Run], name: str) -> bytes:
    """The PNG `name` (one of `wanted(runs)`) as bytes."""
    # a bare Figure renders with Agg and leaves pyplot's global backend and figure list alone
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    curve, heading, y_label = PLOTS[name]
    axis = x_axis([run for run in runs if run.curves])  # one axis for every plot, as the report states
    cjk = cjk_font()
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    for index, run in enumerate(runs):
        if not run.curves.get(curve):
            continue
        steps, values = zip(*run.curves[curve])
        xs = [s * run.tokens_per_step for s in steps] if axis == "tokens" else steps
        # a run keeps its colour in every plot; sparse eval points get markers to stay visible
        ax.plot(xs, values, label=legend_label(run.label, index, cjk), color=f"C{index % 10}", marker="o" if len(xs) <= 20 else None,
                markersize=3)
    ax.set_title(heading)
    ax.set_xlabel("training tokens (step × tokens per step)" if axis == "tokens" else "optimizer step")
    ax.set_ylabel(y_label)
    if axis == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1.5M, 3G: token counts grow long
    if curve == "tokens_per_s":
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    if curve == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", prop={"size": "small", **({"family": ["DejaVu Sans", cjk]} if cjk else {})})
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "Microsoft YaHei", "PingFang SC", "SimHei", "Heiti SC", "Noto Sans CJK JP")


def cjk_font() -> str | None:
    """An installed font with Chinese glyphs, if any (matplotlib's default has none)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def legend_label(label: str, index: int, cjk: str | None) -> str:
    """A run's name, or "run N" (the Nth run given) where no installed font could draw it."""
    return label if label.isascii() or cjk else f"run {index + 1}"
