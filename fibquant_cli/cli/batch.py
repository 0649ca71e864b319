"""`fibquant batch compress|decompress|validate IN [OUT]`: a folder on a Dask cluster.

The commands check flags, call ``ops.batch.run_batch`` and print its table (or JSON); dask and
rich are imported only when a command runs, so ``fibquant --help`` stays cheap.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fibquant_cli.cli import console
from fibquant_cli.cli.errors import flag, handle_errors
from fibquant_cli.cli.options import (
    AttentionOpt,
    BasisOpt,
    BitsOpt,
    CenterKeysOpt,
    CodeBasisOpt,
    EmbedBasisOpt,
    ForceOpt,
    JsonOpt,
    KeepFirstOpt,
    KeepLastOpt,
    KeyBitsOpt,
    KeyKOpt,
    KeyNOpt,
    KOpt,
    NOpt,
    OwnBasisOpt,
    RatioOpt,
    SeedOpt,
    ValueBitsOpt,
    ValueKOpt,
    ValueNOpt,
)
from fibquant_cli.cli.progress import RichProgress

EXIT_NOTE = ("Exit 0 when every file is done or up to date, 3 when any failed (each is named "
             "with its reason in the table and the summary; the others still run), 2 for bad "
             "flags or an OUT that is a file.")

batch_app = typer.Typer(
    rich_markup_mode=None, add_completion=False, no_args_is_help=True,
    help="Run compress, decompress or validate on every file of a folder, each file one task "
    "on Dask's distributed scheduler (a local cluster, or --scheduler ADDRESS). Needs the "
    "batch extra: pip install 'fibquant[batch]'.")

InArg = Annotated[str, typer.Argument(
    help="Folder of inputs (searched recursively): a path, file://, memory://, or an "
    "object-store URL (s3://... with s3fs installed).", show_default=False)]
OutArg = Annotated[str, typer.Argument(
    help="Output folder (created; same relative paths as IN). Holds fibquant-batch.json, "
    "the summary, and .fibquant-stamps/, which make a rerun skip what is up to date.",
    show_default=False)]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", "-w", min=0, help="Worker processes of the local cluster; 0 = one per core.")]
SchedulerOpt = Annotated[str | None, typer.Option(
    "--scheduler", help="Address of a running Dask scheduler (tcp://host:8786) instead of a "
    "local cluster; its workers must see IN and OUT at the same paths or URLs.")]
SplitOpt = Annotated[float, typer.Option(
    "--split-mb", min=0.0, help="Dumps with more KV data than this many MiB are encoded as "
    "layer ranges on several workers (one output, the same bytes).")]


def _run(kind: str, source: str, out: str | None, as_json: bool, **kwargs) -> None:
    from fibquant_cli.errors import InvalidInputError
    from fibquant_cli.ops.batch import run_batch

    with RichProgress() as progress:
        rep = run_batch(kind, source, out, progress=progress, **kwargs)
    console.show(rep, as_json, batch_table)
    if rep.failed:
        first = rep.failed[0].message(flag)
        raise InvalidInputError(f"{len(rep.failed)} of {len(rep.results)} failed; first: "
                                f"{first}" + (f" (summary: {rep.summary})" if rep.summary else ""))


def _split_bytes(split_mb: float) -> int:
    return max(1, int(split_mb * 2**20))


@batch_app.command("compress", epilog=EXIT_NOTE)
@handle_errors
def compress(
    source: InArg,
    out: OutArg,
    bits: BitsOpt = None,
    block_dim: KOpt = None,
    size: NOpt = None,
    key_bits: KeyBitsOpt = None,
    value_bits: ValueBitsOpt = None,
    key_block_dim: KeyKOpt = None,
    key_size: KeyNOpt = None,
    value_block_dim: ValueKOpt = None,
    value_size: ValueNOpt = None,
    keep_first: KeepFirstOpt = 1,  # ops.spec.DEFAULT_KEEP_FIRST (not imported at start-up)
    keep_last: KeepLastOpt = "auto",
    center_keys: CenterKeysOpt = True,
    seed: SeedOpt = 0,
    attention: AttentionOpt = True,
    basis: CodeBasisOpt = None,  # every worker must be able to read it
    embed_basis: EmbedBasisOpt = False,
    ratio: RatioOpt = None,
    own_basis: OwnBasisOpt = "auto",
    workers: WorkersOpt = 0,
    scheduler: SchedulerOpt = None,
    split_mb: SplitOpt = 256.0,
    force: Annotated[bool, typer.Option(
        "--force", help="Redo every output, and overwrite outputs batch did not write.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compress every dump X.safetensors (with X.manifest.json beside it) under IN into
    OUT/X.fq.safetensors, byte-identical to 'fibquant compress X'."""
    from fibquant_cli.ops.spec import resolve_spec

    spec = resolve_spec(bits=bits, block_dim=block_dim, size=size, key_bits=key_bits,
                        value_bits=value_bits, key_block_dim=key_block_dim, key_size=key_size,
                        value_block_dim=value_block_dim, value_size=value_size, seed=seed,
                        keep_first=keep_first, keep_last=keep_last, center_keys=center_keys,
                        basis=basis, embed_basis=embed_basis, ratio=ratio)
    _run("compress", source, out, as_json, spec=spec, attention=attention, force=force,
         workers=workers, scheduler=scheduler, split_bytes=_split_bytes(split_mb),
         own_basis=own_basis)


@batch_app.command("decompress", epilog=EXIT_NOTE)
@handle_errors
def decompress(
    source: InArg,
    out: OutArg,
    workers: WorkersOpt = 0,
    scheduler: SchedulerOpt = None,
    basis: BasisOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore every X.fq.safetensors under IN as OUT/X.safetensors and OUT/X.manifest.json."""
    _run("decompress", source, out, as_json, force=force, workers=workers, scheduler=scheduler,
         basis=basis)


@batch_app.command("validate", epilog=EXIT_NOTE)
@handle_errors
def validate(
    source: InArg,
    out: Annotated[str | None, typer.Argument(
        help="Where to write the summary fibquant-batch.json (optional).",
        show_default=False)] = None,
    workers: WorkersOpt = 0,
    scheduler: SchedulerOpt = None,
    basis: BasisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate every .safetensors file under IN: dumps against their manifests, compressed
    files completely."""
    _run("validate", source, out, as_json, workers=workers, scheduler=scheduler, basis=basis)


def batch_table(rep):
    """One row per file: status, ratio, relative MSE, seconds, and the error of a failure."""
    from rich.table import Table

    counts = ", ".join(f"{rep.count(s)} {s}" for s in ("done", "ok", "skipped", "failed")
                       if rep.count(s))
    table = Table(title=f"batch {rep.kind}: {len(rep.results)} files, {counts}, "
                        f"{rep.seconds:.1f} s on {rep.workers or 'no'} workers")
    for column in ("file", "status", "ratio", "rel. MSE", "seconds", "error"):
        table.add_column(column, justify="right" if column in ("ratio", "rel. MSE", "seconds")
                         else "left", overflow="fold")
    for r in rep.results:
        table.add_row(r.name, r.status, "" if r.ratio is None else f"{r.ratio:.2f}x",
                      "" if r.rel_mse is None else f"{r.rel_mse:.4f}",
                      f"{r.seconds:.2f}", r.message(flag) or "")
    if rep.summary:
        table.caption = f"summary: {rep.summary}"
    return table
