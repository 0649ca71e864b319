"""Trust every byte (issue 12): a property test over random byte flips of a small compressed
file. Every ``decompress``, sliced ``decompress`` and ``validate`` must either refuse it (exit 4,
or 3 when the safetensors framing itself breaks) leaving no file, or -- when the flip lies
outside everything that command reads, or is undone by it -- produce exactly the clean output.
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import invoke, listing, make_dump, ok

SLICE = ("--layers", "1", "--tokens", "3:17")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(directory, compressed bytes, full restore, sliced restore) of a small dump."""
    work = tmp_path_factory.mktemp("flip-src")
    dump = make_dump(work, layers=2, kv_heads=1, query_heads=2, tokens=20)
    comp = work / "c.fq.safetensors"
    for args in (("compress", dump.path, "-o", comp, "--keep-first", "1", "--bits", "1",
                  "--no-attention"),
                 ("decompress", comp, "-o", work / "full.safetensors"),
                 ("decompress", comp, "-o", work / "slice.safetensors", *SLICE)):
        ok(invoke(*args))
    return {"file": comp.read_bytes(),
            "full": ((work / "full.safetensors").read_bytes(),
                     (work / "full.manifest.json").read_bytes()),
            "slice": ((work / "slice.safetensors").read_bytes(),
                      (work / "slice.manifest.json").read_bytes())}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_flips_are_refused_or_harmless(clean, tmp_path_factory, data):
    original = clean["file"]
    # Hypothesis favours small integers (the header's first bytes); a multiplication by a
    # prime modulo the length is a bijection that spreads them over the whole file.
    position = data.draw(st.integers(0, len(original) - 1).map(
        lambda x: x * 1_000_003 % len(original)), label="position")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    work = tmp_path_factory.mktemp("flip")
    path = work / "c.fq.safetensors"
    flipped = bytearray(original)
    flipped[position] ^= mask
    path.write_bytes(flipped)
    before = listing(work)
    for kind, extra in (("full", ()), ("slice", SLICE), ("validate", None)):
        if extra is None:
            result = invoke("validate", path)
        else:
            out = work / "r.safetensors"
            result = invoke("decompress", path, "-o", out, *extra)
        assert result.exit_code in (0, 3, 4), (kind, position, mask, result.output)
        assert "internal error" not in result.output
        event(f"{kind}: exit {result.exit_code}")
        if result.exit_code:
            assert listing(work) == before, (kind, position, mask)
            assert result.stderr.startswith(f"fibquant: error: {path}"), result.stderr
            continue
        if extra is not None:
            got = (out.read_bytes(), (work / "r.manifest.json").read_bytes())
            assert got == clean[kind], (kind, position, mask)
            out.unlink()
            (work / "r.manifest.json").unlink()
    shutil.rmtree(work)
