"""Files written by an earlier release stay readable, and decode to the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from conftest import ok

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# SHA-256 of what fibquant 0.1.0 restored from v1.fq.safetensors (see fixtures/README.md).
RESTORED_BY_0_1_0 = "3ea47ae0d4a6ff295d7d0a22d0c8998324d58845b3fba783af1947c14970c303"


def test_format_1_file_restores_to_the_bytes_0_1_0_wrote(cli, tmp_path):
    src = tmp_path / "v1.fq.safetensors"
    shutil.copy(FIXTURES / "v1.fq.safetensors", src)
    ok(cli("validate", src))
    ok(cli("decompress", src, "-o", tmp_path / "r.safetensors"))
    assert hashlib.sha256((tmp_path / "r.safetensors").read_bytes()).hexdigest() == RESTORED_BY_0_1_0


def test_format_1_file_still_scores_against_its_source(cli, tmp_path):
    result = ok(cli("eval", FIXTURES / "v1.safetensors", FIXTURES / "v1.fq.safetensors", "--json"))
    overall = json.loads(result.stdout)["overall"]
    # 3 bits on Gaussian vectors: relative MSE near the codebook's D_unit (0.029).
    assert 0.015 < overall["rel_mse"] < 0.04
    assert overall["cosine_mean"] > 0.95
