"""The LMO analysis's figures (matplotlib, Agg): observed against fitted loss changes, the fitted
A per window as heatmaps, and the static law's fit."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from mixlab.lmo import WindowFit
from mixlab.report.lmo import (
    LmoResult,
    display_exponent,
    identified_fits,
    mean_r2,
    num,
    window_name,
)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, facecolor="white")
    return buf.getvalue()


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    c = min(cols, max(1, n))
    return (n + c - 1) // c, c


def _scatter(ax: Any, observed: np.ndarray, predicted: np.ndarray, domains: list[str],
             colors: dict[str, str]) -> None:  # fmt: skip
    for i, d in enumerate(domains):
        ax.scatter(observed[:, i], predicted[:, i], s=14, color=colors[d], label=d, alpha=0.85)
    lo = float(np.nanmin([observed.min(), predicted.min()]))
    hi = float(np.nanmax([observed.max(), predicted.max()]))
    ax.plot([lo, hi], [lo, hi], color="#444444", lw=0.8, ls="--")


def lmo_images(res: LmoResult) -> dict[str, bytes]:
    """{file name: PNG bytes}: ``lmo_fit.png``, ``lmo_A.png`` and ``lmo_static.png`` when there
    is something to draw (the names ``lmo_markdown`` links)."""
    from mixlab.report.plots import domain_colors

    doms = res.domains
    colors = domain_colors(doms)
    images: dict[str, bytes] = {}
    # A rank-deficient fit predicts its run's mean rate; scatter only the fits that identify A,
    # unless none does.
    drawn = identified_fits(res)
    fits = drawn or res.fits()
    if fits:
        rows, cols = _grid(len(fits))
        fig = _figure(3.6 * cols, 3.2 * rows)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, (label, wfs) in zip(axes.ravel(), fits):
            obs = np.concatenate([wf.fit.observed for wf in wfs])
            pred = np.concatenate([wf.fit.predicted for wf in wfs])
            _scatter(ax, obs, pred, doms, colors)
            ax.set_title(f"{label}: mean R² {num(mean_r2(wfs))}", fontsize=9)
            ax.set_xlabel("observed ΔL per step", fontsize=8)
            ax.set_ylabel("law: −A p̄", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        for ax in axes.ravel()[len(fits):]:
            ax.set_visible(False)
        axes.ravel()[0].legend(fontsize=7, loc="upper left")
        fig.suptitle("Linear dynamic law: observed vs fitted loss changes", fontsize=10)
        images["lmo_fit.png"] = _png(fig)
        if drawn:
            images["lmo_A.png"] = _heatmaps(drawn, doms)
    if res.static is not None:
        s = res.static
        fig = _figure(4.2, 3.6)
        ax = fig.subplots()
        _scatter(ax, s.observed, s.predicted, doms, colors)
        ax.set_xlabel("observed final loss", fontsize=8)
        ax.set_ylabel("law: c + b exp(−A p)", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_title("Static log-linear law across runs", fontsize=10)
        images["lmo_static.png"] = _png(fig)
    return images


def _heatmaps(fits: list[tuple[str, list[WindowFit]]], domains: list[str]) -> bytes:
    """One row of heatmaps per fit, one panel per window; each row on its own symmetric colour
    scale (0 is white), values written in the cells up to 6 domains."""
    m = len(domains)
    cols = max(len(wfs) for _, wfs in fits)
    side = 1.0 + 0.45 * m
    fig = _figure(side * cols + (0.9 if m > 6 else 0.2), side * len(fits) + 0.4)
    axes = fig.subplots(len(fits), cols, squeeze=False)
    for row, (label, wfs) in zip(axes, fits):
        top = max(float(np.nanmax(np.abs(wf.fit.A))) for wf in wfs) or 1.0
        e = display_exponent(np.array([top]))
        im = None
        for ax, wf in zip(row, wfs):
            im = ax.imshow(wf.fit.A, cmap="RdBu_r", vmin=-top, vmax=top)
            ax.set_xticks(range(m), domains, fontsize=7, rotation=45 if m > 3 else 0)
            ax.set_yticks(range(m), domains, fontsize=7)
            ax.set_title(f"{label}, {window_name(wf)}" + (f", ×10^{e}" if e else ""),
                         fontsize=7)  # fmt: skip
            if m <= 6:
                for i in range(m):
                    for j in range(m):
                        v = wf.fit.A[i, j]
                        ax.text(j, i, f"{v / 10.0**e:.2f}", ha="center", va="center",
                                fontsize=6.5, color="white" if abs(v) > 0.6 * top else "black")  # fmt: skip
        for ax in row[len(wfs):]:
            ax.set_visible(False)
        if m > 6 and im is not None:
            fig.colorbar(im, ax=row.tolist(), shrink=0.8)
    fig.suptitle("Fitted A per window (rows: loss of; columns: share of)", fontsize=9)
    return _png(fig)
