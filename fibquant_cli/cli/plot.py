"""The frontier as a PNG (matplotlib is an optional extra: pip install 'fibquant[plot]')."""

from __future__ import annotations

from pathlib import Path

from fibquant_cli.errors import UsageError
from fibquant_cli.storage.publish import output_path, publishing

MARKERS = {"fibquant": ("o", "tab:blue"), "transform": ("D", "tab:green"),
           "own basis": ("P", "tab:red"), "scalar": ("s", "tab:gray")}


def plot_frontier(rep, path, *, force: bool = True) -> None:
    """Write the sweep's frontier as a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("{plot} needs matplotlib: pip install 'fibquant[plot]'",
                         options=("plot",)) from None
    path = output_path(path)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    groups: dict[str, list] = {}
    for p in rep.points:
        groups.setdefault(p.method if p.method in MARKERS else "peer", []).append(p)
    for name, pts in groups.items():
        marker, color = MARKERS.get(name, ("^", "tab:orange"))
        ax.scatter([p.bits_per_value for p in pts], [p.cosine_mean for p in pts], marker=marker,
                   color=color, label={"peer": "peer formats"}.get(name, name), zorder=3)
        if name == "peer":
            for p in pts:
                ax.annotate(p.label, (p.bits_per_value, p.cosine_mean), fontsize=7,
                            xytext=(3, -9), textcoords="offset points")
    front = sorted((p for p in rep.points if p.pareto), key=lambda p: p.bits_per_value)
    ax.plot([p.bits_per_value for p in front], [p.cosine_mean for p in front], "k--", lw=1,
            label="frontier", zorder=2)
    ax.set_xlabel("bits per value, all-inclusive")
    ax.set_ylabel("proxy cosine (keys as queries)" if rep.proxy else "attention-output cosine")
    ax.set_title(f"memory-fidelity frontier: {Path(rep.source).name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    try:
        with publishing([path], force=force) as (tmp,):
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
