"""Shared test helpers: the one CLI runner (``invoke`` / the ``cli`` fixture) and its checks
(``ok``, ``assert_error``), small synthetic KV dumps, and a throwaway codebook cache.

Every test runs with ``FIBQUANT_CACHE_DIR`` pointing at a private folder of the session, so
codebooks trained by tests never reach the user's cache.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from typer.testing import CliRunner

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
SAMPLE_DUMP = SAMPLE_DIR / "kv_sample.safetensors"
SAMPLE_MANIFEST = SAMPLE_DIR / "kv_sample.manifest.json"

NP_DTYPES = {"f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16),
             "f32": np.dtype(np.float32)}
ST_DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}
_ST_OF_NP = {np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8",
             np.dtype(np.bool_): "BOOL", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}


@pytest.fixture(autouse=True, scope="session")
def _private_codebook_cache(tmp_path_factory):
    """Codebooks trained by a test (non-shipped profiles) go to a throwaway cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIBQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("fq-cache")))
        yield


def invoke(*args, **kwargs):
    """Run ``fibquant *args`` in this process as a user would (arguments as strings); the
    click Result: ``exit_code``, ``stdout``, ``stderr`` (separate), ``output`` (both)."""
    from fibquant_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def cli():
    """``invoke`` as a fixture."""
    return invoke


def ok(result):
    """Assert a CLI result succeeded; return it."""
    detail = f"exit={result.exit_code} exc={result.exception!r}\n{result.output}"
    assert result.exit_code == 0, detail
    assert result.exception is None, detail
    return result


def assert_error(result, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one 'fibquant: error:' line on stderr, no traceback."""
    detail = f"exit={result.exit_code} exc={result.exception!r}\n{result.output}"
    assert result.exit_code == code, detail
    assert isinstance(result.exception, SystemExit), detail  # nothing escaped the handler
    assert "Traceback" not in result.output, detail
    err = result.stderr
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    line = err.rstrip("\n")
    assert line.startswith("fibquant: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def kv_shape(role: str, *, dtype: str = "f16", batch: int = 1, layers: int = 2,
             kv_heads: int = 2, query_heads: int = 4, tokens: int = 32, head_dim: int = 64,
             attention_kind: str = "gqa", rope_state: str | None = None) -> dict:
    """A KV shape object in the contract's key order."""
    if rope_state is None:
        rope_state = "post_rope" if role == "key" else "not_applicable"
    return {"schema_version": "fib_quant_kv_tensor_shape_v1", "role": role,
            "attention_kind": attention_kind, "batch": batch, "layers": layers,
            "kv_heads": kv_heads, "query_heads": query_heads, "tokens": tokens,
            "head_dim": head_dim, "dtype": dtype, "rope_state": rope_state}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """An independent minimal safetensors writer that keeps the given tensor order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, cursor = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_OF_NP[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [cursor, cursor + len(data)]}
        blobs.append(data)
        cursor += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@dataclass
class SynthDump:
    path: Path
    manifest_path: Path
    manifest: dict
    tensors: dict[str, np.ndarray]  # as stored (file order: see header_order(path))
    # (role, layer) -> [batch, kv_heads, tokens, head_dim] values, in the stored dtype
    canonical: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    @property
    def kv_names(self) -> list[str]:
        return [n for e in self.manifest["entries"] for n in e["tensors"]]

    def write_manifest(self, obj: dict | None = None, text: str | None = None) -> None:
        if text is None:
            text = json.dumps(self.manifest if obj is None else obj, indent=2)
        self.manifest_path.write_text(text)


def make_dump(directory: Path, name: str = "kv", *, dtype: str = "f16", batch: int = 1,
              layers: int = 2, kv_heads: int = 2, query_heads: int = 4, tokens: int = 32,
              head_dim: int = 64, layout: str = "bhtd", five_d: bool = False,
              value_layout: str | None = None, queries: bool = True, extras: bool = True,
              scale: float = 1.0, seed: int = 0, metadata: dict | None = None,
              writer: str = "safetensors") -> SynthDump:
    """Write ``name.safetensors`` + ``name.manifest.json`` in ``directory``.

    Keys and values are Gaussian (times ``scale``) with a few channels of larger magnitude.
    ``five_d`` stores the keys as one 5-D canonical tensor; ``layout``/``value_layout`` choose
    the per-layer axis order of keys/values. ``extras`` adds an int64 ``input_ids`` tensor.
    """
    rng = np.random.default_rng(seed)
    np_dtype = NP_DTYPES[dtype]
    value_layout = value_layout or layout
    tensors: dict[str, np.ndarray] = {}
    canonical: dict[tuple[str, int], np.ndarray] = {}
    channel_gain = np.ones(head_dim)
    channel_gain[: head_dim // 8] = 4.0
    entries = []
    if extras:
        tensors["input_ids"] = rng.integers(0, 50_000, size=(batch, tokens), dtype=np.int64)
    for role, lay in (("key", layout), ("value", value_layout)):
        per_layer = []
        for layer in range(layers):
            x = rng.standard_normal((batch, kv_heads, tokens, head_dim)) * channel_gain * scale
            per_layer.append(x.astype(np_dtype))
            canonical[(role, layer)] = per_layer[-1]
        if role == "key" and five_d:
            tname = "cache.key"
            tensors[tname] = np.ascontiguousarray(np.stack(per_layer, axis=1))
            names = [tname]
        else:
            names = []
            for layer, x in enumerate(per_layer):
                tname = f"layer.{layer}.{role}"
                tensors[tname] = np.ascontiguousarray(x.transpose(0, 2, 1, 3) if lay == "bthd" else x)
                names.append(tname)
        shape = kv_shape(role, dtype=dtype, batch=batch, layers=layers, kv_heads=kv_heads,
                         query_heads=query_heads, tokens=tokens, head_dim=head_dim)
        entries.append({"shape": shape, "tensors": names, "layout": lay})
    manifest = {"schema_version": "fibquant_kv_manifest_v1", "entries": entries}
    if queries:
        qnames = []
        for layer in range(layers):
            q = rng.standard_normal((batch, query_heads, tokens, head_dim)).astype(np.float16)
            if layout == "bthd":
                q = np.ascontiguousarray(q.transpose(0, 2, 1, 3))
            qnames.append(f"layer.{layer}.query")
            tensors[qnames[-1]] = q
        manifest["attention"] = {"query_tensors": qnames, "causal": True}
    path = Path(directory) / f"{name}.safetensors"
    if writer == "safetensors":
        safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    else:
        write_safetensors(path, tensors, metadata)
    dump = SynthDump(path, Path(directory) / f"{name}.manifest.json", manifest, tensors, canonical)
    dump.write_manifest()
    return dump


@pytest.fixture
def dump(tmp_path) -> SynthDump:
    """The default small dump: f16, 2 layers, 2 kv heads, 4 query heads, 32 tokens, d=64."""
    return make_dump(tmp_path)


def listing(directory: Path) -> dict[str, bytes]:
    """Every file (hidden and temporary ones included) of a directory with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def read_st_header(path: Path) -> tuple[dict, int]:
    """(header JSON object, data start) parsed independently of fibquant."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), 8 + n


def header_order(path: Path) -> list[str]:
    return [k for k in read_st_header(path)[0] if k != "__metadata__"]


@pytest.fixture
def compressed(cli, tmp_path):
    """A compressed file (in tmp_path/c) whose header ends in padding spaces."""
    work = tmp_path / "c"
    work.mkdir()
    for pad in range(8):  # the source __metadata__ is recorded in the header: vary its length
        dump = make_dump(tmp_path, metadata={"note": "x" * pad}, extras=True)
        out = work / "kv.fq.safetensors"
        if out.exists():
            out.unlink()
        ok(cli("compress", dump.path, "-o", out))
        header, start = read_st_header(out)
        if out.read_bytes()[start - 1:start] == b" ":
            return out
    raise AssertionError("could not produce a padded header")


def rel_mse(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(((x - y) ** 2).sum() / (x * x).sum())


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def load(path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def st_dtype_of(path) -> dict[str, tuple[str, list[int]]]:
    header, _ = read_st_header(path)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def roundtrip(cli, dump, tmp_path, *extra: str) -> tuple[dict, dict, dict]:
    """compress --json + decompress; returns (compress JSON, restored tensors, compressed header)."""
    comp = tmp_path / "out.fq.safetensors"
    restored = tmp_path / "out.restored.safetensors"
    res = ok(cli("compress", dump.path, "-o", comp, "--json", *extra))
    report = json.loads(res.stdout)
    ok(cli("decompress", comp, "-o", restored))
    return report, load(restored), st_dtype_of(comp)


@pytest.fixture(scope="session")
def crash_dir(tmp_path_factory) -> Path:
    """The folder of ``ops.batch``'s crash-once triggers, seen by the cluster's workers."""
    return tmp_path_factory.mktemp("crash-once")


@pytest.fixture(scope="session")
def dask_cluster(crash_dir):
    """One real local Dask cluster for the session: 2 worker processes, 1 thread each.

    Made on first use only (a few seconds); workers inherit this environment (the private
    codebook cache) plus the crash-once folder.
    """
    distributed = pytest.importorskip("distributed")
    import logging
    import warnings

    from fibquant_cli.ops.batch import CRASH_ONCE_ENV

    with warnings.catch_warnings():  # port 8787 taken: its HTTP server takes another
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR,
                                           env={CRASH_ONCE_ENV: str(crash_dir)})
    with cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client
