"""Format 3's block digests, read back by hand as docs/container.md specifies them.

No fibquant parsing: struct, json and blake3 only. Each codes/norms array of every layer has
digests of its consecutive ``block_bytes``-byte blocks, blocks of 4096 vectors.
"""

from __future__ import annotations

import json
import struct

import blake3
import pytest

from conftest import invoke, make_dump, ok


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blocks")
    # 2 heads x 4100 tokens: 8200 vectors per layer, three blocks, the last one short.
    dump = make_dump(tmp, tokens=4100, layers=1, kv_heads=2, query_heads=2, queries=False)
    out = tmp / "o.fq.safetensors"
    ok(invoke("compress", dump.path, "--bits", 3, "--keep-first", 0, "-o", out, "--no-attention",
              "--own-basis", "never"))  # long enough for an own basis to pay: keep per-vector
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8:8 + n])


def test_block_digests_cover_codes_and_norms_in_blocks_of_4096_vectors(written):
    raw, n, header = written
    doc = json.loads(header["__metadata__"]["fibquant"])
    assert doc["format_version"] == 3
    assert sorted(doc["blocks"]) == ["fq/e0/l0/codes", "fq/e0/l0/norms", "fq/e1/l0/codes",
                                     "fq/e1/l0/norms"]
    for name, rec in doc["blocks"].items():
        begin, end = header[name]["data_offsets"]
        data = raw[8 + n + begin:8 + n + end]
        per_vector = 24 if name.endswith("codes") else 2  # d/k = 32 indices of 6 bits; fp16
        assert rec["block_bytes"] == 4096 * per_vector
        blocks = [data[i:i + rec["block_bytes"]] for i in range(0, len(data), rec["block_bytes"])]
        assert len(blocks) == 3 and len(blocks[-1]) == 8 * per_vector
        assert rec["digests"] == ["blake3:" + blake3.blake3(b"fibquant_block_v1\x00" + b).hexdigest()
                                  for b in blocks]
