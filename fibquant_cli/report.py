"""Result dataclasses -> rich tables or JSON. Formats only; never computes."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def fmt_db(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f} dB"


def fmt_float(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def codebook_table(rep) -> Table:
    table = Table(title=f"FibQuant codebook d={rep.head_dim} k={rep.block_dim} N={rep.size}",
                  show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("rate b (bits/coordinate)", f"{rep.rate_bits:.4g}"),
        ("wire bits per index", str(rep.wire_bits)),
        ("bits per vector (with fp16 norm)", str(rep.bits_per_vector)),
        (f"D_unit FibQuant ({rep.eval_vectors:,} fresh vectors)", f"{rep.d_unit:.5f}"),
        ("D_unit scalar Lloyd-Max, same b", fmt_float(rep.scalar_d_unit, 5)),
        ("gain over scalar", fmt_db(rep.gain_db)),
        ("Shannon bound 2^(-2b)", f"{rep.shannon_bound:.5f}"),
        ("gap to Shannon bound", fmt_db(rep.shannon_gap_db)),
        ("training samples", f"{rep.train_samples:,}"),
        (f"codebook {rep.origin}", f"{rep.seconds:.2f} s"),
        ("path", rep.cache_path or "—"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
