"""Comparisons, drawn and tabulated one way for every chapter.

* :data:`PALETTE`: one colour per structure (in the order given), in every figure and
  in the overlays ``chexanatomy segment`` writes;
* :func:`comparison_table`: several models' summaries (:func:`~chexanatomy_lib.evaluation.evaluate.summarize`)
  as one table, a row per (structure, model), each metric as ``mean [lo, hi]``;
* :func:`plot_summary`: the same as bars with 95% intervals;
* :func:`plot_overlays`: radiographs with the reference outlines and each model's masks;
* :func:`plot_reconstructions`: one structure per panel, zoomed, the reference filled and
  each route's mask outlined (the codec's round trips);
* :func:`plot_distributions`, :func:`plot_mean_masks`: several sets of masks (real and
  projected) side by side, as overlaid histograms of a statistic and as mean masks;
* :func:`plot_curves`: a metric against a swept quantity (a shift's magnitude), small
  multiples with 95% bands, one line per model;
* :func:`plot_differences`: paired differences with their intervals and verdicts;
* :func:`plot_agreement`: a measurement from predictions against the same from the
  references, per model, with the line of identity (e.g. the cardiothoracic ratio);
* :func:`plot_claims`: each claim's measurement with its interval against the region
  that would support it, coloured by the verdict.

Figures are returned, not shown.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

#: Structure colours (hex), reused cyclically.
PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe")
#: Line styles of the second, third ... model in an overlay (the first is drawn filled).
_LINESTYLES = (":", "--", "-.")
_ROUTE_COLOURS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple")
_BOUNDED = ("dice", "iou", "box_iou", "box_acc@0.5", "box_acc@0.75", "invalid_rate")


def colour(k: int) -> str:
    """The palette colour of the ``k``-th structure."""
    return PALETTE[k % len(PALETTE)]


def rgb(k: int) -> tuple[int, int, int]:
    """The palette colour of the ``k``-th structure as 8-bit RGB."""
    h = colour(k).lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def comparison_table(summaries: dict[str, pd.DataFrame], metrics: Sequence[str] = ("dice", "box_acc@0.5"),
                     digits: int = 3) -> pd.DataFrame:
    """Several models in one table: rows (structure, model), ``n`` (scored images), the
    invalid-output rate where known, and each metric as ``"mean [lo, hi]"`` (95% bootstrap
    interval; ``"n/a"`` where nothing was scored).

    summaries: ``{model name: summary indexed by structure}`` (from ``evaluate_predictions``
    or ``summarize``); nothing is re-scored here. Structures a model did not predict are
    left out for that model.
    """
    frames = []
    for model, s in summaries.items():
        s = s.set_index("structure") if "structure" in s.columns else s
        f = pd.DataFrame(index=s.index)
        f["model"] = model
        f["n"] = s["n"].astype(int)
        if "invalid_rate" in s.columns:
            f["invalid"] = [f"{v:.2f}" if np.isfinite(v) else "n/a" for v in s["invalid_rate"]]
        for m in metrics:
            f[m] = ["n/a" if not np.isfinite(a) else f"{a:.{digits}f} [{b:.{digits}f}, {c:.{digits}f}]"
                    for a, b, c in zip(s[m], s[f"{m}_lo"], s[f"{m}_hi"])]
        frames.append(f.rename_axis("structure").reset_index())
    table = pd.concat(frames, ignore_index=True)
    order = list(dict.fromkeys(n for s in summaries.values() for n in s.index))
    table["structure"] = pd.Categorical(table["structure"], categories=order, ordered=True)
    table["model"] = pd.Categorical(table["model"], categories=list(summaries), ordered=True)
    return table.sort_values(["structure", "model"]).set_index(["structure", "model"])


def plot_summary(summaries: dict[str, pd.DataFrame], metric: str = "dice", structures: Sequence[str] | None = None,
                 ax=None, title: str | None = None):
    """Per-structure bar chart with 95% CIs comparing models (or codec routes).

    summaries: ``{name: summary indexed by structure}`` with columns ``metric`` and, for the
    error bars, ``<metric>_lo`` and ``<metric>_hi`` (from ``evaluate_predictions`` or
    ``summarize``). Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    missing = [name for name, s in summaries.items() if metric not in s.columns]
    if missing:
        raise ValueError(f"metric {metric!r} is not a column of the summaries of {missing}")
    models = list(summaries)
    if structures is None:
        seen: dict = {}
        for s in summaries.values():
            for name in s.index:
                seen.setdefault(name, None)
        structures = list(seen)
    structures = list(structures)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(18.0, max(6.0, 0.35 * len(structures) * max(1, len(models)) + 2)), 4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(structures))
    for k, model in enumerate(models):
        s = summaries[model].reindex(structures)
        mean = s[metric].to_numpy(dtype=float)
        if f"{metric}_lo" in s:
            lo = s[f"{metric}_lo"].to_numpy(dtype=float)
            hi = s[f"{metric}_hi"].to_numpy(dtype=float)
            err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
            err = np.nan_to_num(err)
        else:
            err = None
        ax.bar(x + (k - (len(models) - 1) / 2) * width, np.nan_to_num(mean), width, yerr=err,
               capsize=2, label=model)
    ax.set_xticks(x)
    ax.set_xticklabels(structures, rotation=60, ha="right", fontsize=8 if len(structures) <= 30 else 6)
    ax.set_ylabel(metric + (" (mean, 95% CI)" if metric != "invalid_rate" else ""))
    if metric in _BOUNDED:
        ax.set_ylim(0, 1.05)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_overlays(images: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray], names: Sequence[str],
                  titles: Sequence[str] | None = None, columns: int | None = None):
    """Radiographs with each structure's reference outline and every model's mask.

    images: float [n, H, W] in [0, 1]; truth: bool [n, S, H, W]; predictions: ``{model
    name: bool [n, S, H, W]}`` (the first is drawn filled, the others as dotted, dashed,
    ... outlines); names: one legend label per structure (its colour in :data:`PALETTE`);
    titles: one per image; columns: images per row (None: all in one row). Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(images)
    models = list(predictions)
    ncol = max(1, min(n, columns or n))
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 3.3 * nrow + 0.3), squeeze=False)
    for ax in axes.reshape(-1)[n:]:
        ax.set_axis_off()
    for k, ax in enumerate(axes.reshape(-1)[:n]):
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1)
        for s in range(truth.shape[1]):
            c = colour(s)
            for j, model in enumerate(models):
                m = predictions[model][k, s]
                if not m.any():
                    continue
                if j == 0:
                    ax.contourf(m.astype(float), levels=[0.5, 1.5], colors=[c], alpha=0.35)
                else:
                    ax.contour(m.astype(float), levels=[0.5], colors=[c], linewidths=1.0,
                               linestyles=_LINESTYLES[(j - 1) % len(_LINESTYLES)])
            if truth[k, s].any():
                ax.contour(truth[k, s].astype(float), levels=[0.5], colors=[c], linewidths=1.2)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    handles = [Patch(color=colour(s), label=nm) for s, nm in enumerate(names)]
    handles.append(Line2D([], [], color="k", lw=1.2, label="reference"))
    for j, model in enumerate(models):
        handles.append(Patch(color="k", alpha=0.35, label=model) if j == 0 else
                       Line2D([], [], color="k", ls=_LINESTYLES[(j - 1) % len(_LINESTYLES)], label=model))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1 / nrow, 1, 1))
    return fig


def plot_curves(curves: pd.DataFrame, panel: str, x: str, line: str, metric: str = "dice",
                xlabels: dict[str, str] | None = None, columns: int = 4, ylim: tuple[float, float] | None = (0, 1.02),
                reference: float | dict | None = None, logx: bool = False,
                xticks: dict[float, str] | None = None):
    """Small multiples of a metric against a swept quantity, one line per model, with 95% bands.

    curves: a table (index or columns) with ``panel``, ``x``, ``line``, ``metric`` and, for
    the bands, ``<metric>_lo`` / ``<metric>_hi`` (from :func:`~chexanatomy_lib.evaluation.evaluate.summarize`),
    e.g. Dice per (model, shift axis, magnitude). One panel per value of ``panel`` (in order
    of appearance), titled with ``xlabels[value]`` as its x label when given; ``reference``
    draws a horizontal line (1 for a ratio), or one per panel (``{panel value: y}``, e.g. a
    fully supervised model's score); ``logx`` puts ``x`` on a log2 axis (k-shot curves);
    ``xticks`` labels the x positions (``{0: "tiny", 1: "small"}``: a swept value that is
    not a number, drawn at its place in the sweep). Lines keep their colour in every
    panel; a panel whose first ``x`` (in the table's order) is not its smallest runs from
    high to low.
    Returns the figure.
    """
    import matplotlib.pyplot as plt

    t = curves.reset_index()
    panels = list(dict.fromkeys(t[panel]))
    lines = list(dict.fromkeys(t[line]))
    ncol = max(1, min(columns, len(panels)))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.6 * nrow + 0.4), squeeze=False)
    for ax in axes.reshape(-1)[len(panels):]:
        ax.set_axis_off()
    for ax, p in zip(axes.reshape(-1), panels):
        given = t.loc[t[panel] == p, x].to_numpy(dtype=float)
        if len(given) > 1 and given[0] > given.min():  # a sweep given from high to low reads left to right
            ax.invert_xaxis()
        for k, name in enumerate(lines):
            g = t[(t[panel] == p) & (t[line] == name)].sort_values(x)
            if not len(g):
                continue
            c = _ROUTE_COLOURS[k % len(_ROUTE_COLOURS)]
            xs = g[x].to_numpy(dtype=float)
            ax.plot(xs, g[metric].to_numpy(dtype=float), "o-", color=c, ms=3, lw=1.3, label=name)
            if f"{metric}_lo" in g:
                ax.fill_between(xs, g[f"{metric}_lo"].to_numpy(dtype=float), g[f"{metric}_hi"].to_numpy(dtype=float),
                                color=c, alpha=0.18, lw=0)
        level = reference.get(p) if isinstance(reference, dict) else reference
        if level is not None:
            ax.axhline(level, color="0.3" if isinstance(reference, dict) else "0.5", lw=0.8, ls=":")
        if logx:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(t.loc[t[panel] == p, x].astype(float)))
            ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        if xticks:
            ax.set_xticks(list(xticks), [str(v) for v in xticks.values()])
            ax.set_xlim(min(xticks) - 0.3, max(xticks) + 0.3)
        ax.set_title(str(p).replace("_", " "), fontsize=9)
        ax.set_xlabel((xlabels or {}).get(p, x), fontsize=8)
        ax.tick_params(labelsize=7)
        if ylim is not None:
            ax.set_ylim(*ylim)
    for row in axes:
        row[0].set_ylabel(metric, fontsize=8)
    handles, labels = axes.reshape(-1)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(lines), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 / nrow, 1, 1))
    return fig


def plot_differences(table: pd.DataFrame, title: str | None = None, ax=None,
                     label: str = "difference (A − B, 95% CI)"):
    """Paired differences as a forest plot: one row per entry of ``table`` (from
    :func:`~chexanatomy_lib.evaluation.evaluate.paired_difference`; its index, joined
    with " · " when it has several levels, names the row), the estimate with its 95%
    interval, coloured by ``verdict``, and the zero line. Returns the Axes."""
    import matplotlib.pyplot as plt

    names = [" · ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (k if isinstance(k, tuple) else (k,)))
             for k in table.index]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.32 * len(table) + 1.0))
    y = np.arange(len(table))[::-1]
    colours = {"A better": "tab:green", "A worse": "tab:red"}
    for yy, (_, r) in zip(y, table.iterrows()):
        c = colours.get(r.get("verdict"), "0.35")
        ax.plot([r["difference_lo"], r["difference_hi"]], [yy, yy], color=c, lw=2)
        ax.plot([r["difference"]], [yy], "o", color=c, ms=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel(label, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_reconstructions(image: np.ndarray, originals: np.ndarray, reconstructions: dict[str, np.ndarray],
                         names: Sequence[str], titles: Sequence[str], zoom: bool = True, axes=None):
    """One column per structure: the original mask (filled) and each route's reconstruction (outline).

    image: float [H, W] in [0, 1]; originals: bool [K, H, W]; reconstructions: {route: bool [K, H, W]};
    names: route label per colour; titles: one per column. With ``zoom`` each panel shows
    the structure's box plus a margin. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    k = len(originals)
    if axes is None:
        _, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.9), squeeze=False)
        axes = axes[0]
    colours = _ROUTE_COLOURS
    h, w = originals.shape[-2:]
    for j in range(k):
        ax = axes[j]
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~originals[j], originals[j]), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
        for c, (route, rec) in enumerate(reconstructions.items()):
            if rec[j].any():
                ax.contour(rec[j].astype(float), levels=[0.5], colors=colours[c % len(colours)], linewidths=1.0)
        if zoom and originals[j].any():
            rows = np.flatnonzero(originals[j].any(1))
            cols = np.flatnonzero(originals[j].any(0))
            m = max(6, int(0.15 * max(rows[-1] - rows[0], cols[-1] - cols[0])))
            ax.set_xlim(max(cols[0] - m, 0), min(cols[-1] + m, w - 1))
            ax.set_ylim(min(rows[-1] + m, h - 1), max(rows[0] - m, 0))
        ax.set_title(titles[j], fontsize=9)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[c % len(colours)], label=r) for c, r in enumerate(reconstructions)]
    handles.insert(0, plt.Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.35, label="original"))
    axes[-1].legend(handles=handles, fontsize=7, loc="lower right")
    return axes


def plot_distributions(tables: dict[str, pd.DataFrame], columns: Sequence[str], bins: int = 25, axes=None):
    """Overlaid histograms (densities) of ``columns`` for several sets: ``{set name: table
    with those columns}`` (e.g. :func:`~chexanatomy_lib.evaluation.domain_gap.shape_statistics`).
    One panel per column, a dashed line at each set's median. Returns the Axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 2.9), squeeze=False)
        axes = axes[0]
    for ax, col in zip(axes, columns):
        values = [t[col].dropna().to_numpy() for t in tables.values()]
        lo, hi = min(v.min() for v in values if len(v)), max(v.max() for v in values if len(v))
        edges = np.linspace(lo, hi, bins + 1)
        for k, (name, v) in enumerate(zip(tables, values)):
            c = _ROUTE_COLOURS[k % len(_ROUTE_COLOURS)]
            ax.hist(v, bins=edges, density=True, alpha=0.45, color=c, label=f"{name} (n={len(v)})")
            ax.axvline(np.median(v), color=c, ls="--", lw=1)
        ax.set_title(col.replace("_", " "), fontsize=9)
        ax.set_yticks([])
    axes[0].legend(fontsize=7)
    return axes


def plot_mean_masks(sets: dict[str, np.ndarray], axes=None):
    """One panel per set of masks bool [N, H, W]: the mean mask (the share of masks covering
    each pixel, 0 to 1) with its 0.5 contour. Returns the Axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.3), squeeze=False)
        axes = axes[0]
    for ax, (name, masks) in zip(axes, sets.items()):
        mean = np.asarray(masks, dtype=bool).mean(0)
        ax.imshow(mean, cmap="magma", vmin=0, vmax=1)
        ax.contour(mean, levels=[0.5], colors=["w"], linewidths=1.0)
        ax.set_title(f"{name}\nmean of {len(masks)} masks", fontsize=8)
        ax.set_axis_off()
    return axes



def plot_agreement(pairs: dict[str, tuple], label: str, threshold: float | None = None, ax=None):
    """Predicted against reference values of one measurement, a colour per model.

    pairs: ``{model: (reference float [n], predicted float [n])}`` (NaN pairs skipped);
    threshold: a decision threshold drawn on both axes (e.g. 0.5 for the cardiothoracic
    ratio). The dotted diagonal is perfect agreement. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.4, 4.2))
    values = []
    for k, (model, (ref, pred)) in enumerate(pairs.items()):
        r, p = np.asarray(ref, float), np.asarray(pred, float)
        ok = ~(np.isnan(r) | np.isnan(p))
        ax.scatter(r[ok], p[ok], s=18, alpha=0.8, color=_ROUTE_COLOURS[k % len(_ROUTE_COLOURS)],
                   label=f"{model} (n={int(ok.sum())})")
        values += [r[ok], p[ok]]
    both = np.concatenate(values) if values else np.array([0.0, 1.0])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ":", color="0.4", lw=1)
    if threshold is not None:
        ax.axvline(threshold, color="0.7", lw=0.8)
        ax.axhline(threshold, color="0.7", lw=0.8)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"{label}, reference masks", fontsize=8)
    ax.set_ylabel(f"{label}, predicted masks", fontsize=8)
    ax.legend(fontsize=7)
    return ax


_VERDICT_COLOURS = {"supported": "tab:green", "contradicted": "tab:red", "not decided": "0.45"}


def plot_claims(table: pd.DataFrame, levels: dict[str, tuple[str, float]], columns: int = 2):
    """One panel per claim: every measurement of it (a row of
    :func:`~chexanatomy_lib.evaluation.claims.claims_table`, labelled by its source and
    detail) as its value with its 95% interval, coloured by its verdict, over the shaded
    region in which it would be supported. levels: ``{claim id: (test, level)}``.
    Returns the figure."""
    import textwrap

    import matplotlib.pyplot as plt

    t = table[table["value"].notna()]
    claims = list(dict.fromkeys(t["claim"]))
    if not claims:
        fig, ax = plt.subplots(figsize=(5, 1))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no claim measured", ha="center", va="center")
        return fig
    ncol = max(1, min(columns, len(claims)))
    nrow = -(-len(claims) // ncol)
    rows_max = max(int((t["claim"] == c).sum()) for c in claims)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, (0.5 * rows_max + 1.1) * nrow), squeeze=False)
    for ax in axes.reshape(-1)[len(claims):]:
        ax.set_axis_off()
    for ax, c in zip(axes.reshape(-1), claims):
        g = t[t["claim"] == c]
        test, level = levels[c]
        lo_all = min(float(g["lo"].min()), -level if test == "within" else level)
        hi_all = max(float(g["hi"].max()), level)
        pad = 0.12 * (hi_all - lo_all or 1.0)
        left, right = lo_all - pad, hi_all + pad
        region = {"above": (level, right), "below": (left, level), "within": (-level, level)}[test]
        ax.axvspan(*region, color="tab:green", alpha=0.08, lw=0)
        for x in ((-level, level) if test == "within" else (level,)):
            ax.axvline(x, color="0.3", lw=0.8, ls=":")
        y = np.arange(len(g))[::-1]
        for yy, (_, r) in zip(y, g.iterrows()):
            col = _VERDICT_COLOURS.get(r["verdict"], "0.45")
            ax.plot([r["lo"], r["hi"]], [yy, yy], color=col, lw=2.2)
            ax.plot([r["value"]], [yy], "o", color=col, ms=4)
            source = ", ".join(str(r["from"]).split(", ")[:2])
            ax.text(left + 0.01 * (right - left), yy + 0.18, f"{source} · {r['detail']}"[:90], fontsize=6.5,
                    va="bottom", color="0.2")
        ax.set_yticks([])
        ax.set_ylim(-0.5, len(g) - 0.1)
        ax.set_xlim(left, right)
        ax.set_title("\n".join(textwrap.wrap(f"{c}: {g['measure'].iloc[0]} ({r['verdict']})" if len(g) == 1
                                             else f"{c}: {g['measure'].iloc[0]}", 70)), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig
