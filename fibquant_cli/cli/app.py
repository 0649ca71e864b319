"""The Typer app: thin commands that check flags, call one operation, print its result.

Errors become one line and an exit code inside the app (``cli.errors``), so tests see what
users see; the options shared by commands are declared once in ``cli.options``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fibquant_cli.cli import console
from fibquant_cli.cli.batch import batch_app
from fibquant_cli.cli.errors import OneLineErrors, handle_errors, state
from fibquant_cli.cli.options import (
    AttentionOpt,
    BasisOpt,
    BitsOpt,
    CenterKeysOpt,
    CodeBasisOpt,
    ContinuationOpt,
    DtypeOpt,
    EmbedBasisOpt,
    ForceOpt,
    IdsOpt,
    JsonOpt,
    KeepFirstOpt,
    KeepLastOpt,
    KeyBitsOpt,
    KeyKOpt,
    KeyNOpt,
    KOpt,
    ManifestOpt,
    ModelOpt,
    NOpt,
    OutOpt,
    OwnBasisOpt,
    PathArg,
    PrefixOpt,
    RatioOpt,
    ScoringQueriesOpt,
    SeedOpt,
    TextOpt,
    ValueBitsOpt,
    ValueKOpt,
    ValueNOpt,
)
from fibquant_cli.cli.progress import RichProgress
from fibquant_cli.errors import UsageError

app = typer.Typer(
    cls=OneLineErrors,
    rich_markup_mode=None,  # plain help: rich's help formatter alone doubled start-up time
    add_completion=False,
    no_args_is_help=True,
    help="Compress transformer KV-cache safetensors dumps with FibQuant vector quantization.",
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    state["debug"] = debug


@app.command()
@handle_errors
def codebook(
    head_dim: Annotated[int, typer.Option("--head-dim", help="Vector length d.")] = 64,
    block_dim: Annotated[int, typer.Option("--block-dim", help="Block length k.")] = 2,
    size: Annotated[int, typer.Option("--size", help="Codebook size N.")] = 64,
    seed: SeedOpt = 0,
    eval_vectors: Annotated[int, typer.Option(
        "--eval-vectors", min=1000, help="Fresh unit vectors for D_unit.")] = 100_000,
    as_json: JsonOpt = False,
) -> None:
    """Build or load a codebook and measure its distortion against scalar and Shannon."""
    from fibquant_cli.cli import tables
    from fibquant_cli.ops.codebook import codebook_report, profile_from_options

    profile = profile_from_options(head_dim, block_dim, size, seed)
    with RichProgress() as progress:
        rep = codebook_report(profile, eval_vectors, progress)
    console.show(rep, as_json, tables.codebook_table)


# Paths are taken as typed (str): ``Path`` would drop a trailing '/', and ``kv.safetensors/``
# or ``-o newdir/`` name folders, which the library refuses (formats.untrusted.input_path,
# storage.publish.output_path).


@app.command()
@handle_errors
def validate(path: PathArg, manifest: ManifestOpt = None, basis: BasisOpt = None,
             as_json: JsonOpt = False) -> None:
    """Check a dump against its manifest, or a compressed file completely."""
    from fibquant_cli.cli import tables
    from fibquant_cli.ops.inspect import validate as run

    rep = run(path, manifest, basis)
    console.show(rep, as_json, tables.validate_table)
    if rep.error is not None:
        raise rep.error


@app.command()
@handle_errors
def digest(
    path: Annotated[str, typer.Argument(help="A manifest (.json), a dump or a compressed file.")],
    as_json: JsonOpt = False,
) -> None:
    """BLAKE3 digests: manifest entry shapes, dump tensors, or a compressed file's records."""
    from fibquant_cli.cli import tables
    from fibquant_cli.ops.inspect import digest as run

    rep = run(path)
    if as_json:
        console.print_json(rep.to_json())
    else:
        tables.print_digests(rep)
    if rep.error is not None:
        raise rep.error


@app.command()
@handle_errors
def compress(
    path: PathArg,
    manifest: ManifestOpt = None,
    output: OutOpt = None,
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
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also measure the scalar baseline at the same rate.")] = False,
    attention: AttentionOpt = True,
    max_queries: Annotated[int | None, typer.Option(
        "--max-queries", min=1, help="Score attention on the last N query positions (N >= "
        "tokens: all of them). Default: 256 positions sampled over the whole context; with "
        "--target-cosine, the last 2048, as its search.")] = None,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=0, help="Encoder threads; 0 = automatic (by dump size).")] = 0,
    target_cosine: Annotated[float | None, typer.Option(
        "--target-cosine", help="Pick the cheapest operating point whose attention cosine "
        "(mean) on this dump meets C.")] = None,
    basis: CodeBasisOpt = None,
    embed_basis: EmbedBasisOpt = False,
    ratio: RatioOpt = None,
    own_basis: OwnBasisOpt = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compress a KV dump into one self-contained .fq.safetensors file."""
    from fibquant_cli.api import compress_file
    from fibquant_cli.cli import tables
    from fibquant_cli.ops.spec import DEFAULT_KEEP_FIRST, KEEP_LAST_AUTO

    rate_flags = (bits, block_dim, size, key_bits, value_bits, key_block_dim, key_size,
                  value_block_dim, value_size)
    if target_cosine is not None:
        if (any(f is not None for f in rate_flags) or keep_first != DEFAULT_KEEP_FIRST
                or keep_last != KEEP_LAST_AUTO or not center_keys):
            raise UsageError("{target_cosine} picks the rates itself: drop --bits, --block-dim, "
                             "--size, the --key-*/--value-* flags, --keep-* and "
                             "--no-center-keys", options=("target_cosine",))
        from fibquant_cli.ops.fidelity import DEFAULT_MAX_QUERIES
        from fibquant_cli.ops.target import choose_for_target

        if ratio is not None or embed_basis or own_basis == "always":
            raise UsageError("{target_cosine} picks the ratio itself: drop --ratio, "
                             "--embed-basis and --own-basis always", options=("target_cosine",))
        # the search scores the last 2,048 positions; the report then scores the same ones
        max_queries = max_queries or DEFAULT_MAX_QUERIES
        with RichProgress() as progress:
            spec, choice = choose_for_target(path, target_cosine, manifest=manifest, seed=seed,
                                             max_queries=max_queries, basis=basis,
                                             own_basis=basis is None and own_basis == "auto",
                                             progress=progress)
        # the target was measured with the codec it picked: an own basis at its ratio
        # (``spec.own_transform``), else that codec alone
        own_basis = None if spec.own_transform else "never"
        options = {}
    else:
        choice, spec = None, None
        options = dict(bits=bits, block_dim=block_dim, size=size, key_bits=key_bits,
                       value_bits=value_bits, key_block_dim=key_block_dim, key_size=key_size,
                       value_block_dim=value_block_dim, value_size=value_size, seed=seed,
                       keep_first=keep_first, keep_last=keep_last, center_keys=center_keys,
                       basis=basis, embed_basis=embed_basis, ratio=ratio)
    with RichProgress() as progress:
        rep = compress_file(path, output, manifest=manifest, spec=spec, compare=compare,
                            force=force, attention=attention, max_queries=max_queries, jobs=jobs,
                            own_basis=own_basis, progress=progress, **options)
    if as_json:
        from fibquant_cli.ops.fidelity import headline

        console.print_json({**rep.to_json(), "headline": headline(rep.attention),
                            "target": None if choice is None else choice.to_json()})
        return
    if choice is not None:
        console.stdout().print(
            f"--target-cosine {choice.target}: picked {spec.label()}, attention cosine "
            f"{choice.measured_cosine:.4f} ({len(choice.tried)} points tried, cheapest first)")
    if rep.attention is not None:
        from fibquant_cli.ops.fidelity import headline

        lead = headline(rep.attention)
        console.stdout().print(f"{lead['label']}: {lead['value']:.4f} at {rep.total.ratio:.2f}x "
                               f"({'PROXY, ' if rep.attention.proxy else ''}the statistic that "
                               "ranks operating points like the model's own KL)")
    console.stdout().print(tables.compress_table(rep, compare))
    if rep.own_basis is not None:
        console.stdout().print(tables.own_basis_line(rep.own_basis))
    if rep.attention is not None:
        console.stdout().print(tables.fidelity_table(rep.attention, "fidelity"))
    elif attention:
        console.stdout().print("attention fidelity: not measured (needs exactly one key and one "
                            "value entry of the same geometry)")


@app.command()
@handle_errors
def decompress(
    path: PathArg,
    output: OutOpt = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Only layers START:STOP (random access; reads only their bytes).")] = None,
    tokens: Annotated[str | None, typer.Option(
        "--tokens", help="Only tokens START:STOP of each selected layer.")] = None,
    force: ForceOpt = False,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=0, help="Decoder threads; 0 = automatic (2 on 2+ cores).")] = 0,
    basis: BasisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify every digest, then restore the dump (every tensor) and its manifest.

    With --layers/--tokens, decode just that slice (and its queries) into a smaller dump.
    """
    from fibquant_cli.api import decompress_file
    from fibquant_cli.cli import tables

    with RichProgress() as progress:
        rep = decompress_file(path, output, layers=layers, tokens=tokens, force=force,
                              jobs=jobs, basis=basis, progress=progress)
    console.show(rep, as_json, tables.decompress_table)


@app.command()
@handle_errors
def calibrate(
    dumps: Annotated[list[str], typer.Argument(
        help="Calibration dumps of one model (other texts than the ones to compress).",
        show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="The basis file to write "
                                         "(MODEL.basis.safetensors).", show_default=False)],
    keep_first: Annotated[int, typer.Option(
        help="Leave the first T tokens (attention sinks) out of the fit.")] = 1,
    rope_undo: Annotated[bool, typer.Option(
        "--rope-undo/--no-rope-undo", help="Undo RoPE on post-RoPE keys before fitting "
        "(needs the manifest's rope object).")] = True,
    model: ModelOpt = None,
    text: TextOpt = None,
    ids: IdsOpt = None,
    prefix_tokens: PrefixOpt = 1024,
    continuation_tokens: ContinuationOpt = 256,
    draws: Annotated[int, typer.Option(
        min=1, help="With --model: noise draws averaged per layer and role (one "
        "continuation scored each).")] = 2,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Learn a model-level PCA basis per layer (keys and values) for transform coding.

    Also measures each layer's sensitivity: with --model, by the model's own next-token KL
    over a text (docs/transform.md: lower KL at every ratio); otherwise, when the dumps have
    queries, by the attention outputs.
    """
    _model_inputs(model, text, ids, "calibrate")
    options = dict(output=output, keep_first=keep_first, rope_undo=rope_undo, force=force)
    with RichProgress() as progress:
        if model is None:
            from fibquant_cli.ops.calibrate import calibrate as run

            rep = run(dumps, progress=progress, **options)
        else:
            from fibquant_cli.hf.sensitivity import calibrate_with_model

            rep = calibrate_with_model(dumps, model=model, text=text, ids_from=ids,
                                       prefix=prefix_tokens, continuation=continuation_tokens,
                                       draws=draws, progress=progress, **options)
    from fibquant_cli.cli import tables

    console.show(rep, as_json, tables.calibrate_table)


def _model_inputs(model, text, ids, what: str) -> None:
    if model is None:
        if text is not None or ids is not None:
            raise UsageError(f"--text and --ids go with --model ({what})")
        return
    if (text is None) == (ids is None):
        raise UsageError(f"{what} --model needs exactly one of --text FILE and --ids DUMP")


def _print_model_report(rep, as_json: bool) -> None:
    from fibquant_cli.cli import tables  # noqa: F401  (rich is loaded only here)
    from fibquant_cli.cli.model_tables import checks_lines, model_table

    if as_json:
        console.print_json(rep.to_json())
    else:
        for line in checks_lines(rep):
            console.stdout().print(line)
        console.stdout().print(model_table(rep))
    if not rep.checks_passed:
        from fibquant_cli.errors import IntegrityError

        failed = ", ".join(c["name"] for c in rep.checks if not c["passed"])
        raise IntegrityError(f"self-check failed: {failed}", path=rep.model)


@app.command(name="eval")
@handle_errors
def evaluate(
    original: Annotated[str | None, typer.Argument(
        help="The original dump (not with --model).", show_default=False)] = None,
    other: Annotated[str | None, typer.Argument(
        help="A compressed file or a restored dump.", show_default=False)] = None,
    manifest: ManifestOpt = None,
    max_queries: ScoringQueriesOpt = None,
    model: ModelOpt = None,
    text: TextOpt = None,
    ids: IdsOpt = None,
    prefix_tokens: PrefixOpt = 1024,
    continuation_tokens: ContinuationOpt = 512,
    dtype: DtypeOpt = "f16",
    bits: BitsOpt = None,
    block_dim: KOpt = None,
    size: NOpt = None,
    key_bits: Annotated[float | None, typer.Option(help="Preset for keys only.")] = None,
    value_bits: Annotated[float | None, typer.Option(help="Preset for values only.")] = None,
    keep_first: Annotated[int, typer.Option(
        help="With --model: first T tokens stored exactly.")] = 1,
    keep_last: Annotated[str, typer.Option(
        metavar="T|auto", help="With --model: last T tokens stored exactly (auto: as "
        "compress).")] = "auto",
    center_keys: Annotated[bool, typer.Option(
        "--center-keys/--no-center-keys", help="With --model: key centering.")] = True,
    seed: SeedOpt = 0,
    basis: Annotated[str | None, typer.Option(
        "--basis", help="With --model: transform-code against this basis (from a different "
        "text); --bits is then all-inclusive bits per value. Without: the basis OTHER needs.")
    ] = None,
    ratio: RatioOpt = None,
    own_basis: OwnBasisOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Attention fidelity of a compressed file, or with --model the model's own loss.

    With --model: NLL, ΔNLL, KL and top-1 agreement of a continuation scored through the
    prefix's cache compressed and restored, against the uncompressed cache.
    """
    _model_inputs(model, text, ids, "eval")
    if model is not None:
        if original is not None or other is not None:
            raise UsageError("eval --model takes no file arguments (it builds the cache itself)")
        from fibquant_cli.hf.evaluate import evaluate_model
        from fibquant_cli.ops.spec import resolve_spec

        spec = resolve_spec(bits=bits, block_dim=block_dim, size=size, key_bits=key_bits,
                            value_bits=value_bits, seed=seed, keep_first=keep_first,
                            keep_last=keep_last, center_keys=center_keys, basis=basis,
                            ratio=ratio)
        with RichProgress() as progress:
            rep = evaluate_model(model, text=text, ids_from=ids, specs=[spec],
                                 prefix=prefix_tokens, continuation=continuation_tokens,
                                 dtype=dtype, attention=True, max_queries=max_queries,
                                 progress=progress, own_basis=own_basis, skip_failed=False)
        _print_model_report(rep, as_json)
        return
    if original is None or other is None:
        raise UsageError("eval needs ORIGINAL and OTHER (or --model with --text/--ids)")
    from fibquant_cli.cli import tables
    from fibquant_cli.ops.evaluate import evaluate as run

    rep = run(original, other, manifest=manifest, max_queries=max_queries or 2048, basis=basis)
    if as_json:
        console.print_json(rep.to_json())
    else:
        console.stdout().print(tables.fidelity_table(rep, f"{other} vs {original}"))


@app.command()
@handle_errors
def dump(
    model: Annotated[str, typer.Option(
        "--model", help="A local Hugging Face model folder or a .gguf file (needs fibquant[hf]).",
        show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="The dump (.safetensors).",
                                         show_default=False)],
    text: TextOpt = None,
    ids: IdsOpt = None,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Tokens to run.")] = 1024,
    dtype: DtypeOpt = "f16",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a model over a text and write its KV cache as a dump and manifest.

    Keys and values per layer in the cache's layout, post-RoPE queries (for attention
    fidelity), input_ids, and the RoPE parameters in the manifest.
    """
    _model_inputs(model, text, ids, "dump")
    from fibquant_cli.hf.kvfile import dump_model

    summary = dump_model(model, out=output, text=text, ids_from=ids, tokens=tokens, dtype=dtype,
                         force=force)
    if as_json:
        console.print_json(summary)
        return
    rope = summary["rope"]
    console.stdout().print(
        f"{summary['dump']} (+ {summary['manifest']}): {summary['model_type']}, "
        f"{summary['layers']} layers, {summary['query_heads']} query / {summary['kv_heads']} KV "
        f"heads, head_dim {summary['head_dim']}, {summary['tokens']} tokens, {summary['dtype']}; "
        + ("no RoPE" if rope is None else f"RoPE theta {rope['theta']:g} {rope['style']}")
        + ("" if summary["key_match_error"] is None else
           f"; keys recomputed from the projections match the cache to "
           f"{summary['key_match_error']:.1e}"))
    if summary["note"]:
        console.stdout().print(summary["note"])


@app.command()
@handle_errors
def sweep(
    path: Annotated[str | None, typer.Argument(
        help="A safetensors dump (not with --model).", show_default=False)] = None,
    manifest: ManifestOpt = None,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Write the frontier as a PNG (needs matplotlib).")] = None,
    peers: Annotated[bool, typer.Option(
        "--peers/--no-peers", help="Include llama.cpp (gguf), KIVI and fp8 formats.")] = True,
    max_queries: ScoringQueriesOpt = None,
    model: ModelOpt = None,
    text: TextOpt = None,
    ids: IdsOpt = None,
    prefix_tokens: PrefixOpt = 1024,
    continuation_tokens: ContinuationOpt = 512,
    dtype: DtypeOpt = "f16",
    basis: Annotated[str | None, typer.Option(
        "--basis", help="Add the transform codec against this basis at ratios 4x..20x.")] = None,
    own_basis: Annotated[bool, typer.Option(
        "--own-basis", help="Add the transform codec at ratios 4x..20x against a basis fitted "
        "on the dump (with --model: on the prefix's cache), embedded in every file (what "
        "compress does for long dumps).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run many operating points and print the memory-fidelity frontier.

    With --model the yardstick is the model's KL on a continuation, not attention cosine.
    """
    if plot is not None and not plot.lower().endswith(".png"):
        raise UsageError("{plot} writes a PNG: give a path ending in .png", path=str(plot),
                         options=("plot",))
    _model_inputs(model, text, ids, "sweep")
    if model is not None:
        if path is not None:
            raise UsageError("sweep --model takes no dump argument (it builds the cache itself)")
        from fibquant_cli.hf.evaluate import MODEL_PEERS, evaluate_model, model_specs

        if plot is not None:
            from fibquant_cli.cli.model_tables import require_matplotlib

            require_matplotlib()  # before the long run, not after it
        with RichProgress() as progress:
            rep = evaluate_model(model, text=text, ids_from=ids, specs=model_specs(basis=basis),
                                 peers=MODEL_PEERS if peers else (), prefix=prefix_tokens,
                                 continuation=continuation_tokens, dtype=dtype, attention=True,
                                 max_queries=max_queries, progress=progress,
                                 own_ladder=own_basis)
        if plot is not None:
            from fibquant_cli.cli.model_tables import plot_model_frontier

            plot_model_frontier(rep, plot)
            if not as_json:
                console.stdout().print(f"frontier plot: {plot}")
        _print_model_report(rep, as_json)
        return
    if path is None:
        raise UsageError("sweep needs a dump (or --model with --text/--ids)")
    from fibquant_cli.cli import tables
    from fibquant_cli.ops.sweep import sweep as run

    with RichProgress() as progress:
        rep = run(path, manifest=manifest, max_queries=max_queries or 2048, peers=peers,
                  basis=basis, own_basis=own_basis, progress=progress)
    if plot is not None:
        from fibquant_cli.cli.plot import plot_frontier

        plot_frontier(rep, plot)
    console.show(rep, as_json, tables.sweep_table)
    if plot is not None and not as_json:
        console.stdout().print(f"frontier plot: {plot}")


# `fibquant batch compress|decompress|validate` (cli/batch; dask is imported only when it runs).
app.add_typer(batch_app, name="batch")


def main() -> None:
    from fibquant_cli.ops import process
    from fibquant_cli.storage.publish import install_signal_handlers

    install_signal_handlers()
    process.start()
    app(prog_name="fibquant")
