"""The command-line options shared by the commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1,
                                      help="Seed of rotation and codebook.")]
PathArg = Annotated[str, typer.Argument(help="A safetensors file.", show_default=False)]
ManifestOpt = Annotated[str | None, typer.Option(
    "--manifest", "-m", help="Shape manifest (default: X.manifest.json beside X.safetensors).")]
OutOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output file.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
AttentionOpt = Annotated[bool, typer.Option(
    "--attention/--no-attention", help="Measure attention fidelity (queries, or a key proxy).")]
MaxQueriesOpt = Annotated[int, typer.Option(
    "--max-queries", min=1, help="Score attention on the last N query positions.")]
BitsOpt = Annotated[float | None, typer.Option(
    "--bits", help="Rate preset: >=4 -> (k=2,N=256), 3 -> (2,64), 2 -> (4,256), 1 -> (8,256), "
    "0.5 -> (8,16). Default 3.")]
KOpt = Annotated[int | None, typer.Option("--block-dim", help="Block length k.")]
NOpt = Annotated[int | None, typer.Option("--size", help="Codebook size N.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="A local Hugging Face model folder or a .gguf file (needs fibquant[hf]).")]
TextOpt = Annotated[str | None, typer.Option(
    "--text", help="With --model: a UTF-8 text file, tokenized by the model's tokenizer.")]
IdsOpt = Annotated[str | None, typer.Option(
    "--ids", help="With --model: take the token ids from this dump's input_ids instead.")]
PrefixOpt = Annotated[int, typer.Option(
    "--prefix-tokens", min=1, help="With --model: tokens whose cache is compressed.")]
ContinuationOpt = Annotated[int, typer.Option(
    "--continuation-tokens", min=1, help="With --model: tokens scored through the cache.")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="With --model: dtype of the dump, the uncompressed reference (f16, bf16, f32).")]
ScoringQueriesOpt = Annotated[int | None, typer.Option(
    "--max-queries", min=1, help="Score attention on the last N query positions (default "
    "2048; with --model compress's default sample).")]

BasisOpt = Annotated[str | None, typer.Option(
    "--basis", help="The basis file a transform-coded file was coded against (its digest is "
    "checked; not needed when the file embeds it).")]
RatioOpt = Annotated[float | None, typer.Option(
    "--ratio", help="The transform codec's compression ratio, all inclusive: against --basis, "
    "or without it against a basis fitted on the dump and embedded.")]

# compress's rate and token options (compress and batch compress).
KeyBitsOpt = Annotated[float | None, typer.Option(help="Preset for keys only.")]
ValueBitsOpt = Annotated[float | None, typer.Option(help="Preset for values only.")]
KeyKOpt = Annotated[int | None, typer.Option(help="k for keys only.")]
KeyNOpt = Annotated[int | None, typer.Option(help="N for keys only.")]
ValueKOpt = Annotated[int | None, typer.Option(help="k for values only.")]
ValueNOpt = Annotated[int | None, typer.Option(help="N for values only.")]
KeepFirstOpt = Annotated[int, typer.Option(
    help="Store the first T tokens of every layer uncompressed (the attention sink; "
    "0 compresses it too).")]  # default ops.spec.DEFAULT_KEEP_FIRST (not imported at start-up)
KeepLastOpt = Annotated[str, typer.Option(
    metavar="T|auto",
    help="Store the last T tokens of every layer uncompressed. auto: with --basis at ratios "
    ">= 8, the last tokens/(16 x ratio) when that is >= 16 (1/16 of the file); otherwise "
    "none.")]
CenterKeysOpt = Annotated[bool, typer.Option(
    "--center-keys/--no-center-keys",
    help="Subtract each head's mean key before encoding (stored; exact for attention).")]
CodeBasisOpt = Annotated[str | None, typer.Option(
    "--basis", help="Transform-code against this basis (from 'fibquant calibrate'); --bits then "
    "means all-inclusive bits per value (default 2.5).")]
EmbedBasisOpt = Annotated[bool, typer.Option(
    "--embed-basis", help="With --basis: store the basis in the file (self-contained, "
    "larger).")]
OwnBasisOpt = Annotated[str, typer.Option(
    "--own-basis", help="Without --basis: auto transform-codes against a basis fitted on the "
    "dump and embedded when that measures better at the same size (long dumps); always, "
    "never.")]
