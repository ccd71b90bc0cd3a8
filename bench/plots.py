"""Plot helpers shared by the benchmarks (matplotlib, Agg backend: no display needed).

    from bench.plots import speedup_vs_sparsity     # or `from plots import ...` inside bench/
    speedup_vs_sparsity(points, "bench/out/peers.png", title="DeiT-S, batch 8, fp32")

A point is a dict with ``engine`` (one line per engine), ``sparsity`` (x: fraction removed, in
[0, 1]), ``speedup`` (y: ratio to the reference, > 1 is faster) and optionally ``panel`` (one
subplot per panel, e.g. "unstructured" vs "structured + blocks", so that points of different
pattern families at the same sparsity are not joined by one line) and ``label`` (annotation).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

MARKERS = "os^Dv<>pP*Xh"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def speedup_vs_sparsity(points: Sequence[Dict], path: str, title: str = "", reference: str = "1.0 = reference",
                        panels: Optional[List[str]] = None,
                        xlabel: str = "sparsity (% of block parameters removed)") -> str:
    """Draw speed-up vs sparsity, one line per engine, one subplot per panel; write a PNG to ``path``.

    Engines keep the same colour and marker in every panel. Returns ``path``.
    """
    if not points:
        raise ValueError("speedup_vs_sparsity: no points to plot")
    plt = _pyplot()
    panels = panels or list(dict.fromkeys(p.get("panel", "") for p in points))
    engines = list(dict.fromkeys(p["engine"] for p in points))
    style = {e: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, e in enumerate(engines)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for engine in engines:
            mine = sorted((p for p in points if p["engine"] == engine and p.get("panel", "") == panel),
                          key=lambda p: p["sparsity"])
            if not mine:
                continue
            colour, marker = style[engine]
            ax.plot([100 * p["sparsity"] for p in mine], [p["speedup"] for p in mine], marker=marker,
                    color=colour, label=engine)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"speed-up ({reference})")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title, y=0.02, va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.9))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
