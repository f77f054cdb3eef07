"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display, no
pyplot global state, so it is safe in any process).

Every figure keeps one colour per domain (a soft palette, for areas) and one per method (a
strong palette, for lines and bars; the baseline is grey) across all figures of a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mixlab.report.runs import Run
from mixlab.report.table import Comparison

DPI = 110
BASELINE_COLOR = "#5f5f5f"
METHOD_PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
    "#17becf", "#e377c2", "#bcbd22", "#8c564b", "#393b79",
]  # fmt: skip
DOMAIN_PALETTE = [
    "#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3", "#a6d854", "#ffd92f", "#e5c494",
    "#b3b3b3", "#8dd3c7", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#fccde5",
]  # fmt: skip


@dataclass(frozen=True)
class FigureInfo:
    """A written figure: file name (inside the report dir), title and caption."""

    name: str
    title: str
    caption: str


def domain_colors(domains: Sequence[str]) -> dict[str, str]:
    return {d: DOMAIN_PALETTE[i % len(DOMAIN_PALETTE)] for i, d in enumerate(domains)}


def method_colors(methods: Sequence[str], baseline: str | None) -> dict[str, str]:
    colors: dict[str, str] = {}
    i = 0
    for m in methods:
        if m == baseline:
            colors[m] = BASELINE_COLOR
        else:
            colors[m] = METHOD_PALETTE[i % len(METHOD_PALETTE)]
            i += 1
    return colors


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, facecolor="white")


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return (n + cols - 1) // cols, cols


def token_scale(max_tokens: float) -> tuple[float, str]:
    """(divisor, unit word) so that token axes read 0.5-500 rather than 0.0005 or 5e6."""
    if max_tokens >= 1e6:
        return 1e6, "millions"
    if max_tokens >= 1e3:
        return 1e3, "thousands"
    return 1.0, "tokens"


def _max_tokens(runs: Sequence[Run]) -> float:
    vals = [float(ln.get("tokens", 0)) for r in runs for ln in (*r.train, *r.evals)]
    vals += [float((r.summary or {}).get("tokens") or 0) for r in runs]
    return max(vals, default=0.0)


def _by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label or r.mixer, []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r.seed)
    return groups


# ---------------------------------------------------------------------------------------------
# Weight trajectories


def weight_series(run: Run) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens [n], weights [n, m], probes_dropped) from the run's train lines.

    The weights are the mixture the model trained on: a line's ``loss_weights`` when it has
    them (a method that samples uniformly and re-weights the loss), else its ``weights``.
    Lines logged during a mixer's probe phase (Aioli's LearnParams) are left out when the run
    has ordinary lines too: probes are one-hot-like mixtures that would hide the trajectory.
    """
    domains = run.domains
    lines = [ln for ln in run.train if isinstance(ln.get("weights"), dict)]
    ordinary = [ln for ln in lines if ln.get("phase", "train") == "train"]
    dropped = bool(ordinary) and len(ordinary) < len(lines)
    use = ordinary or lines
    tokens = np.array([float(ln.get("tokens", 0)) for ln in use])
    weights = np.array([[float(_mixture(ln).get(d) or 0.0) for d in domains] for ln in use])
    return tokens, weights.reshape(len(use), len(domains)), dropped


def _mixture(line: dict) -> dict:
    lw = line.get("loss_weights")
    return lw if isinstance(lw, dict) and lw else line["weights"]


def plot_weights(runs: Sequence[Run], path: Path, all_seeds: bool = False) -> FigureInfo | None:
    """Stacked areas of the sampling weights over training tokens, one panel per run shown
    (the lowest seed of each method, or every seed with ``all_seeds``)."""
    groups = _by_method(runs)
    shown = [r for rs in groups.values() for r in (rs if all_seeds else rs[:1]) if r.train]
    if not shown:
        return None
    domains = _all_domains(shown)
    colors = domain_colors(domains)
    div, unit = token_scale(_max_tokens(shown))
    rows, cols = _grid(len(shown))
    fig = _new_figure(4.2 * cols + 1.2, 2.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    any_dropped = False
    for ax, run in zip(axes.flat, shown):
        tokens, w, dropped = weight_series(run)
        any_dropped |= dropped
        rd = run.domains
        x = tokens / div
        ax.stackplot(
            x, w.T, labels=rd, colors=[colors[d] for d in rd], alpha=0.95,
            edgecolor="white", linewidth=0.3,
        )  # fmt: skip
        ax.set_title(f"{run.label or run.mixer} (seed {run.seed})", fontsize=11)
        if x.size > 1:
            ax.set_xlim(float(x.min()), float(x.max()))
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"training tokens ({unit})")
        ax.set_ylabel("mixture weight")
        ax.margins(x=0)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    handles = [_patch(colors[d]) for d in domains]
    fig.legend(handles, domains, loc="outside right center", title="domain", frameon=False)
    fig.suptitle("Domain weights during training", fontsize=13)
    _save(fig, path)
    caption = (
        "Weight of each domain in the training mixture over training (stacked: the bands sum "
        "to 1); for a method that re-weights the loss, its loss weights."
    )
    if any_dropped:
        caption += (
            " Probe steps (mixtures a method trains on to measure, not to learn) are omitted."
        )
    return FigureInfo(path.name, "Weight trajectories", caption)


def _patch(color: str) -> Patch:
    return Patch(facecolor=color, edgecolor="none")


def _all_domains(runs: Sequence[Run]) -> list[str]:
    out: list[str] = []
    for r in runs:
        for d in r.domains:
            if d not in out:
                out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# Eval loss curves


def _eval_curves(run: Run, domains: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(tokens [n], {domain or 'average': loss [n]}) from the run's validation eval lines."""
    lines = [ln for ln in run.evals if ln.get("split", "val") == "val" and ln.get("loss")]
    tokens = np.array([float(ln.get("tokens", 0)) for ln in lines])
    curves = {
        d: np.array([_f(ln["loss"].get(d)) for ln in lines], dtype=np.float64) for d in domains
    }
    curves["average"] = np.array([_f(ln.get("avg_loss")) for ln in lines], dtype=np.float64)
    return tokens, curves


def _f(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")


def plot_eval_losses(runs: Sequence[Run], path: Path, colors: dict[str, str]) -> FigureInfo | None:
    """Validation loss per domain (one panel each, plus the average) for every method: the
    mean over seeds, with the range over seeds shaded."""
    groups = {m: [r for r in rs if r.evals] for m, rs in _by_method(runs).items()}
    groups = {m: rs for m, rs in groups.items() if rs}
    if not groups:
        return None
    domains = _all_domains([r for rs in groups.values() for r in rs])
    panels = [*domains, "average"]
    div, unit = token_scale(_max_tokens([r for rs in groups.values() for r in rs]))
    rows, cols = _grid(len(panels))
    fig = _new_figure(3.9 * cols + 1.4, 2.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for method, rs in groups.items():
        curves = [_eval_curves(r, domains) for r in rs]
        n = min(len(t) for t, _ in curves)
        if n == 0:
            continue
        x = curves[0][0][:n] / div
        for ax, panel in zip(axes.flat, panels):
            ys = np.stack([c[panel][:n] for _, c in curves])
            if np.all(np.isnan(ys)):
                continue
            color = colors.get(method, BASELINE_COLOR)
            ax.plot(x, np.nanmean(ys, axis=0), color=color, lw=1.6, label=method)
            if len(rs) > 1:
                ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=color,
                                alpha=0.15, lw=0)  # fmt: skip
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel if panel != "average" else "average over domains", fontsize=11)
        ax.set_xlabel(f"training tokens ({unit})")
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        _zoom_tail(ax)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="method", frameon=False)
    seeds = max(len(rs) for rs in groups.values())
    fig.suptitle(
        "Validation loss per domain"
        + (f" (mean over {seeds} seeds, range shaded)" if seeds > 1 else ""),
        fontsize=13,
    )
    _save(fig, path)
    return FigureInfo(
        path.name,
        "Validation loss per domain",
        "Loss on each domain's fixed validation subset as training goes on; lower is better. "
        "The y axis starts after the first evaluation so that differences late in training show.",
    )


def _zoom_tail(ax: Axes) -> None:
    """Limit the y range to the values after the first point of each line: the loss at the
    first evaluation is far above the rest and would flatten every difference that matters."""
    vals: list[float] = []
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=np.float64)
        vals.extend(y[1:][np.isfinite(y[1:])] if y.size > 2 else y[np.isfinite(y)])
    if len(vals) < 2:
        return
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad, hi + pad)


# ---------------------------------------------------------------------------------------------
# Final comparison


def outlier_limit(values: Sequence[float]) -> float | None:
    """An axis bound (on |value|) that leaves out one far outlier, or None when there is none.

    A bar more than 4x further from 0 than every other would flatten the rest to nothing
    (a method that specialises on a target can have 6x the perplexity of the others); it is
    drawn cut at the bound, with its value written on it.
    """
    mags = sorted((abs(v) for v in values if np.isfinite(v)), reverse=True)
    if len(mags) < 3 or mags[1] == 0 or mags[0] <= 4.0 * mags[1]:
        return None
    return 1.35 * mags[1]


def _bars(
    ax: Axes,
    names: list[str],
    means: np.ndarray,
    errs: np.ndarray,
    colors: list[str],
    fmt: str,
    signed: bool,
) -> None:
    """Bars with std error bars, each labelled with its value past the end of its error bar;
    a far outlier is cut at the axis limit (``outlier_limit``) and marked with an arrow."""
    x = np.arange(len(names))
    limit = outlier_limit(list(means + np.sign(means) * errs))
    shown = np.clip(means, -limit, limit) if limit else means
    ax.bar(x, shown, yerr=errs if errs.any() and not limit else None, color=colors, capsize=4,
           edgecolor="black", lw=0.5)  # fmt: skip
    if limit and errs.any():
        small = np.abs(means) <= limit
        ax.errorbar(x[small], means[small], yerr=errs[small], fmt="none", ecolor="black",
                    capsize=4)  # fmt: skip
    for xi, v, e, sv in zip(x, means, errs, shown):
        if not np.isfinite(v):
            continue
        up = v >= 0
        clipped = sv != v
        text = (f"{v:+{fmt}}" if signed else f"{v:{fmt}}") + (" ↑" if clipped and up else "")
        text += " ↓" if clipped and not up else ""
        end = sv if clipped else v + (e if up else -e)
        ax.annotate(text, (xi, end), textcoords="offset points", xytext=(0, 3 if up else -11),
                    ha="center", fontsize=8, fontweight="bold" if clipped else "normal")  # fmt: skip
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)


def plot_comparison(cmp: Comparison, path: Path, colors: dict[str, str]) -> FigureInfo:
    """Bars of average test perplexity and, with two or more methods, of the paired difference
    from the baseline (and of the target loss's, when a target is configured); error bars are
    the standard deviation over seeds."""
    methods = list(cmp.methods)
    others = [m for m in methods if m.method != cmp.baseline]
    with_target = bool(others) and cmp.has_target
    n_panels = 1 + bool(others) + with_target
    fig = _new_figure(4.6 * n_panels + 0.4, 3.8)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]

    ax = axes[0]
    means = np.array([m.avg_ppl.mean for m in methods], dtype=np.float64)
    errs = np.array([m.avg_ppl.std or 0.0 for m in methods])
    _bars(ax, [m.method for m in methods], means, errs,
          [colors.get(m.method, BASELINE_COLOR) for m in methods], ".2f", signed=False)  # fmt: skip
    limit = outlier_limit(list(means + errs))
    hi = float(limit if limit else np.max(means + errs))
    lo = float(np.min(means - errs))
    pad = max(0.15 * (hi - lo), 0.02 * hi)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_ylabel("average test perplexity")
    ax.set_title("Average test perplexity (lower is better)", fontsize=11)
    if ax.get_ylim()[0] > 0:
        ax.text(0.01, 0.99, "y axis does not start at 0", transform=ax.transAxes, va="top",
                fontsize=7, color="#777777")  # fmt: skip

    other_colors = [colors.get(m.method, BASELINE_COLOR) for m in others]
    names = [m.method for m in others]
    if others:
        ax = axes[1]
        d_mean = np.array([np.nan if m.diff.mean is None else m.diff.mean for m in others])
        d_err = np.array([m.diff.std or 0.0 for m in others])
        _bars(ax, names, d_mean, d_err, other_colors, ".2f", signed=True)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(f"Δ avg test PPL vs {cmp.baseline}")
        ax.set_title(f"Paired Δ perplexity vs {cmp.baseline} (< 0 = better)", fontsize=11)
        ax.margins(y=0.25)
    if with_target:
        ax = axes[2]
        t_mean = np.array([np.nan if m.target_diff.mean is None else m.target_diff.mean
                           for m in others])  # fmt: skip
        t_err = np.array([m.target_diff.std or 0.0 for m in others])
        _bars(ax, names, t_mean, t_err, other_colors, ".3f", signed=True)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(f"Δ target loss vs {cmp.baseline} (nats/token)")
        ax.set_title(f"Paired Δ target loss vs {cmp.baseline} (< 0 = better)", fontsize=11)
        ax.margins(y=0.25)
    n = len(cmp.seeds)
    fig.suptitle(
        f"Final comparison ({n} seed{'s' if n != 1 else ''}"
        + (", error bars: std over seeds)" if n > 1 else ")"),
        fontsize=13,
    )
    _save(fig, path)
    caption = "Left: the average of the per-domain test perplexities."
    if others:
        caption += (
            f" Then the paired difference from {cmp.baseline} (same seed), mean over seeds"
            + (
                ", for perplexity and for the loss on the held-out target set"
                if with_target
                else ""
            )
            + "; '~' in the table marks a difference within noise (two standard errors)."
            " A bar cut by the axis carries an arrow and its value."
        )
    return FigureInfo(path.name, "Final comparison", caption)


# ---------------------------------------------------------------------------------------------
# Tokens and repeats


def plot_tokens(runs: Sequence[Run], path: Path, colors: dict[str, str]) -> FigureInfo | None:
    """Grouped bars per domain: training tokens drawn and epochs (repeats) per method, mean
    over seeds."""
    groups = {m: [r for r in rs if r.finished] for m, rs in _by_method(runs).items()}
    groups = {m: rs for m, rs in groups.items() if rs}
    if not groups:
        return None
    domains = _all_domains([r for rs in groups.values() for r in rs])
    fig = _new_figure(max(9.0, 1.6 * len(domains) + 3.0), 3.6)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    div, unit = token_scale(_max_tokens([r for rs in groups.values() for r in rs]) / len(domains))
    k = len(groups)
    width = 0.8 / k
    x = np.arange(len(domains))
    for i, (method, rs) in enumerate(groups.items()):
        tok = np.array(
            [np.mean([float((r.summary or {}).get("tokens_per_domain", {}).get(d, 0)) for r in rs])
             for d in domains]
        ) / div  # fmt: skip
        ep = np.array(
            [np.mean([float((r.summary or {}).get("epochs_per_domain", {}).get(d, 0)) for r in rs])
             for d in domains]
        )  # fmt: skip
        offset = (i - (k - 1) / 2) * width
        color = colors.get(method, BASELINE_COLOR)
        axes[0].bar(x + offset, tok, width, color=color, label=method, edgecolor="black", lw=0.3)
        axes[1].bar(x + offset, ep, width, color=color, label=method, edgecolor="black", lw=0.3)
    axes[0].set_ylabel(f"training tokens ({unit})")
    axes[0].set_title("Tokens drawn per domain", fontsize=11)
    axes[1].set_ylabel("epochs (windows drawn / available)")
    axes[1].set_title("Repeats per domain", fontsize=11)
    axes[1].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[1].annotate("1 epoch", (0.01, 1.0), xycoords=("axes fraction", "data"), ha="left",
                     va="bottom", fontsize=8)  # fmt: skip
    for ax in axes:
        ax.set_xticks(x, domains, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="method", frameon=False)
    fig.suptitle("Data seen per domain (mean over seeds)", fontsize=13)
    _save(fig, path)
    return FigureInfo(
        path.name,
        "Tokens seen and repeats",
        "Training tokens each method drew from each domain, and how many times over it went "
        "through that domain's training split (above 1 = repeated data).",
    )
