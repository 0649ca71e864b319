"""Result records -> rich tables. Formats only; never computes. Imported by the commands that
print a table, not at start-up."""

from __future__ import annotations

from rich.table import Table

from fibquant_cli.cli import console


def fmt_db(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f} dB"


def fmt_float(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def codebook_table(rep) -> Table:
    table = Table(title=f"FibQuant codebook d={rep.head_dim} k={rep.block_dim} N={rep.size}",
                  show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right", overflow="fold")
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
        (f"codebook origin: {rep.origin}", f"{rep.seconds:.2f} s"),
        ("path", rep.cache_path or "—"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _mark(ok: bool) -> str:
    return "[green]pass[/green]" if ok else "[red]FAIL[/red]"


def validate_table(rep) -> Table:
    table = Table(title=f"validate {rep.path} ({rep.kind})", header_style="bold")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    options = getattr(rep.error, "options", ()) or ()
    for name, ok, detail in rep.checks:
        if not ok and options:  # the failure's reason names options as flags, as errors do
            from fibquant_cli.cli.errors import flag

            detail = detail.format(**{o: flag(o) for o in options})
        table.add_row(name, _mark(ok), detail)
    return table


def print_digests(rep) -> None:
    """One line per digest (no table: digests are meant to be copied whole)."""
    console.stdout().print(f"[bold]digests of {rep.path}[/bold] ({rep.kind})")
    width = max((len(row["name"]) for row in rep.rows), default=0)
    for row in rep.rows:
        status = ""
        if "status" in row:
            status = "  [green]ok[/green]" if row["status"] == "ok" else "  [red]MISMATCH[/red]"
        extra = f"  {row['dtype']} {row['shape']}" if "dtype" in row else ""
        console.stdout().print(f"{row['name']:<{width}}  {row['digest']}{status}{extra}", soft_wrap=True)
    for key, value in rep.summary.items():
        console.stdout().print(f"{key}: {value}", soft_wrap=True)


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1024
    return ""


def _profile_cell(row) -> str:
    p = row.profile
    if not p:
        return ""
    if p.get("codec") == "transform":  # coded bits per value: mean, and the layers' range
        return (f"transform {p['mean_code_bits_per_value']:.2f} b "
                f"({p['min_layer']:.2f}-{p['max_layer']:.2f})")
    return f"k={p['block_dim']} N={p['size']} b={p['rate_bits']:.3g}"


def compress_table(rep, compare: bool) -> Table:
    """One column per entry (role) and one for the total; one row per quantity."""
    rows = [*rep.entries, rep.total]
    table = Table(title=f"{rep.source} -> {rep.output}", header_style="bold")
    table.add_column("")
    for row in rows:
        table.add_column(row.label, justify="right", style="bold" if row is rep.total else None)

    def add(name, fmt):
        table.add_row(name, *[fmt(r) for r in rows])

    add("profile", _profile_cell)
    if any(r.profile and "keep_last" in r.profile for r in rep.entries):  # the transform codec
        add("tokens kept exact", lambda r: f"first {r.profile['keep_first']}, last "
            f"{r.profile['keep_last']}" if r.profile else "")
    add("source bytes", lambda r: _size(r.source_bytes))
    add("compressed bytes (all-in)", lambda r: _size(r.compressed_bytes))
    add("ratio", lambda r: f"{r.ratio:.2f}x")
    add("bits/value, payload", lambda r: f"{r.payload_bits_per_value:.3f}")
    add("bits/value, all-in", lambda r: f"{r.bits_per_value:.3f}")
    add("relative MSE", lambda r: f"{r.rel_mse:.4f}")
    if compare:
        add("scalar relative MSE, same b", lambda r: fmt_float(r.scalar_rel_mse, 4))
    add("cosine, mean", lambda r: f"{r.cosine_mean:.4f}")
    add("cosine, worst vector", lambda r: f"{r.cosine_min:.4f}")
    table.caption = (f"file {_size(rep.file_bytes)}, of which {_size(rep.passthrough_bytes)} "
                     f"pass-through ({', '.join(rep.passthrough) or 'none'}). All-in counts "
                     "indices, norms, codebook, rotation and metadata.")
    return table


def decompress_table(rep) -> Table:
    table = Table(title=f"{rep.source} -> {rep.output} (+ {rep.manifest_output})",
                  header_style="bold")
    for name in ("tensor", "dtype", "shape", "restored as"):
        table.add_column(name)
    for row in rep.tensors:
        table.add_row(row["name"], row["dtype"], str(row["shape"]), row["kind"])
    return table


def fidelity_table(fid, title: str) -> Table:
    """Per-layer attention fidelity and the overall row."""
    kind = "key self-attention PROXY (no queries)" if fid.proxy else "attention output"
    table = Table(title=f"{title}: {kind}, {'causal' if fid.causal else 'non-causal'}, "
                        + (f"{fid.query_positions} of {fid.tokens} query positions in "
                           f"{len(fid.layers)} layers, sampled over the context and the depth "
                           "(--max-queries N: the last N, every layer)"
                           if getattr(fid, "sampled", False) else
                           f"last {fid.query_positions} of {fid.tokens} query positions"),
                  header_style="bold")
    for name in ("layer", "key rel. MSE", "value rel. MSE", "cos mean", "cos p1", "cos min",
                 "TV mean", "top-8 agree"):
        table.add_column(name, justify="right")
    for row in [*fid.layers, {"layer": "all", **fid.overall}]:
        table.add_row(str(row["layer"]), f"{row['key_rel_mse']:.4f}", f"{row['value_rel_mse']:.4f}",
                      f"{row['cosine_mean']:.4f}", f"{row['cosine_p1']:.4f}",
                      f"{row['cosine_min']:.4f}", f"{row['tv_mean']:.4f}",
                      f"{row['top8_agreement']:.3f}",
                      style="bold" if row["layer"] == "all" else None)
    if fid.note:
        table.caption = fid.note
    return table


def sweep_table(rep) -> Table:
    kind = "key self-attention PROXY cosine" if rep.proxy else "attention-output cosine"
    table = Table(title=f"memory-fidelity frontier of {rep.source} ({kind}, last "
                        f"{rep.query_positions} query positions)", header_style="bold")
    for name, justify in [("method", "left"), ("operating point", "left"), ("ratio", "right"),
                          ("bits/value all-in", "right"), ("rel. MSE", "right"),
                          ("cos mean", "right"), ("cos p1", "right"), ("top-8", "right"),
                          ("time s", "right"), ("frontier", "center")]:
        table.add_column(name, justify=justify)
    for p in rep.points:
        table.add_row(p.method, p.label, f"{p.ratio:.2f}x", f"{p.bits_per_value:.3f}",
                      f"{p.rel_mse:.4f}", f"{p.cosine_mean:.4f}", f"{p.cosine_p1:.4f}",
                      f"{p.top8:.3f}", f"{p.seconds:.2f}", "[green]best[/green]" if p.pareto else "",
                      style="bold" if p.pareto else None)
    notes = ["'best' = on the frontier: no other point is both smaller and more faithful."]
    notes += [f"skipped {name}: {reason}" for name, reason in rep.skipped.items()]
    table.caption = "\n".join(notes)
    return table


def calibrate_table(rep) -> Table:
    """The basis file just written: geometry, how much it compacts, sensitivity, digest."""
    table = Table(title=f"calibrate -> {rep.output}", header_style="bold")
    table.add_column("quantity")
    table.add_column("value", overflow="fold")
    sens = rep.sensitivity
    rows = [
        ("dumps", ", ".join(s["file"] for s in rep.sources)),
        ("layers x D", f"{rep.layers} x {rep.dim} ({rep.kv_heads} KV heads x {rep.head_dim})"),
        ("tokens fitted per matrix", f"{rep.tokens:,} (first {rep.keep_first} excluded)"),
        ("keys", "RoPE undone" if rep.rope_undone else "fitted as stored"),
        *[(f"{role} variance in top 25% of components", f"{share:.3f} (mean over layers)")
          for role, share in rep.top_variance.items()],
        ("sensitivity (per rel. MSE)",
         "— (no queries in the dumps, no --model)" if sens is None else
         f"{sens['min']:.3g} .. {sens['max']:.3g}, {rep.sensitivity_by}"),
        ("digest", rep.digest),
        ("seconds", f"{rep.seconds:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def own_basis_line(dec: dict) -> str:
    """compress without --basis: what was chosen between the per-vector codec and an own
    basis, and the measurement behind it."""
    line = f"own basis ({dec['mode']}): {dec['choice']}; {dec['reason']}"
    if dec["basis_bytes"] is not None:
        line += (f". Own basis {_size(dec['basis_bytes'])}, {dec['basis_share']:.1%} of the "
                 f"KV bytes of a {_size(dec['budget_bytes'])} file; {dec['seconds']:.1f} s")
    return line
