"""``eval --model`` / ``sweep --model`` results as rich tables and a PNG (no torch here)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from fibquant_cli.errors import UsageError
from fibquant_cli.storage.publish import publishing


def checks_lines(rep) -> list[str]:
    """One line per self-check: PASS/FAIL, the value and its limit."""
    out = []
    for c in rep.checks:
        mark = "[green]PASS[/green]" if c["passed"] else "[red]FAIL[/red]"
        out.append(f"self-check {c['name']}: {mark}  {c['value']:.2e} (limit {c['limit']:.0e}): "
                   f"{c['what']}")
    return out


def model_table(rep) -> Table:
    """One row per operating point: size, the continuation's NLL, ΔNLL, KL and top-1."""
    table = Table(title=f"{Path(rep.model).name} on {Path(rep.text).name}: {rep.prefix_tokens}-"
                        f"token prefix cached, {rep.continuation_tokens} continuation tokens "
                        f"scored (reference: uncompressed {rep.dtype} cache)",
                  header_style="bold")
    for name, justify in [("method", "left"), ("operating point", "left"), ("ratio", "right"),
                          ("bits/value", "right"), ("NLL", "right"), ("ΔNLL", "right"),
                          ("KL", "right"), ("top-1 agree", "right"), ("attn cos mean", "right"),
                          ("time s", "right"), ("frontier", "center")]:
        table.add_column(name, justify=justify)
    for p in sorted(rep.points, key=lambda p: -p.ratio):
        cos = "" if not p.attention else f"{p.attention['cosine_mean']:.4f}"
        table.add_row(p.method, p.label, f"{p.ratio:.2f}x", f"{p.bits_per_value:.3f}",
                      f"{p.nll:.4f}", f"{p.delta_nll:+.4f}", f"{p.kl:.4f}", f"{p.top1:.3f}",
                      cos, f"{p.seconds:.1f}", "[green]best[/green]" if p.pareto else "",
                      style="bold" if p.pareto else None)
    notes = ["KL = mean KL(p_ref || p) of the next-token distributions, nats; 'best' = no other "
             "point is both smaller and lower in KL."]
    notes += [f"skipped {name}: {reason}" for name, reason in rep.skipped.items()]
    if rep.note:
        notes.append(rep.note)
    table.caption = "\n".join(notes)
    return table


def require_matplotlib():
    """matplotlib.pyplot (Agg), or a UsageError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'fibquant[plot]'") from None
    return plt


def plot_model_frontier(rep, path) -> None:
    """KL against bits per value, log scale, fibquant and the peers."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for p in rep.points:
        if p.method == "reference":
            continue
        from fibquant_cli.cli.plot import MARKERS

        marker, color = MARKERS.get(p.method, ("^", "tab:orange"))
        ax.scatter(p.bits_per_value, max(p.kl, 1e-6), marker=marker, color=color, zorder=3)
        ax.annotate(p.label, (p.bits_per_value, max(p.kl, 1e-6)), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per value, all-inclusive")
    ax.set_ylabel("KL to the uncompressed cache (nats, log)")
    ax.set_title(f"{Path(rep.model).name}: KL vs size ({Path(rep.text).name})")
    ax.grid(alpha=0.3)
    try:
        with publishing([Path(path)], force=True) as (tmp,):
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
