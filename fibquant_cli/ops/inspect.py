"""validate and digest: check a dump or a compressed file, list digests (nothing written)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fibquant_cli.errors import FibQuantError
from fibquant_cli.formats import container, stfile, untrusted
from fibquant_cli.formats.digest import file_digest, tensor_digest
from fibquant_cli.formats.kvdump import check_finite, open_dump, read_layer
from fibquant_cli.formats.kvlayout import entry_layer_views
from fibquant_cli.formats.manifest import load_manifest

# --------------------------------------------------------------------------- validate


@dataclass
class ValidateReport:
    path: str
    kind: str  # "dump" or "compressed"
    checks: list = field(default_factory=list)  # (name, ok, detail)
    error: FibQuantError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "ok": self.ok,
                "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
                "error": None if self.error is None else str(self.error)}


def validate(path, manifest=None, basis=None) -> ValidateReport:
    """Run every check of a dump (against its manifest) or of a compressed file (``basis``:
    the basis file a transform-coded file was coded against, unless it embeds it)."""
    rep = ValidateReport(str(path), "dump")
    try:
        path = untrusted.input_path(path)
        header = stfile.read_header(path)
    except FibQuantError as err:
        rep.checks.append(("safetensors header", False, err.reason))
        rep.error = err
        return rep
    if container.is_compressed(header):
        rep.kind = "compressed"
        try:
            from fibquant_cli.ops.verify import verify  # the numeric core, only here

            verify(path, rep.checks, basis=basis)
        except FibQuantError as err:
            rep.checks.append(("integrity", False, err.reason))
            rep.error = err
        return rep
    rep.checks.append(("safetensors header", True, f"{len(header.tensors)} tensors"))
    step = "manifest and shape contract"
    try:
        dump = open_dump(path, manifest)
        rep.checks.append((step, True, f"{dump.manifest_path.name}: {len(dump.manifest.entries)} entries"))
        rep.checks.append(("tensors vs manifest", True, "names, shapes and dtypes agree"))
        step = "values finite, norms in range"
        n = 0
        for entry in dump.manifest.entries:
            for layer in range(entry.shape.layers):
                arr = read_layer(dump, entry, layer)
                _check_norms(dump, entry, layer, arr)
                n += 1
        if dump.manifest.attention is not None:
            for name in dump.manifest.attention.query_tensors:
                check_finite(dump.header, name, stfile.read_tensor(dump.header, name))
                n += 1
        rep.checks.append((step, True, f"{n} layer tensors scanned"))
        rep.checks.append(("pass-through tensors", True,
                           ", ".join(dump.passthrough_names) or "none"))
    except FibQuantError as err:
        if step == "manifest and shape contract" and err.path and err.path == str(path):
            rep.checks.append((step, True, "manifest parses"))
            step = "tensors vs manifest"
        rep.checks.append((step, False, err.reason))
        rep.error = err
    return rep


def _check_norms(dump, entry, layer: int, arr) -> None:
    """Every vector's norm fits the norms compress stores (keys centered or not)."""
    from fibquant_cli.codecs.fibquant import norms_dtype

    for center in ((False, True) if entry.shape.role == "key" else (False,)):
        try:
            norms_dtype(arr, center, 0, 0)
        except FibQuantError as err:
            name, index = entry_layer_views(entry)[layer]
            raise err.at(path=str(dump.path), tensor=name,
                         field=None if index is None else f"layer {layer}") from None


# --------------------------------------------------------------------------- digest


@dataclass
class DigestReport:
    path: str
    kind: str  # "manifest", "dump" or "compressed"
    rows: list = field(default_factory=list)  # dicts: name, digest, [status]
    summary: dict = field(default_factory=dict)
    error: FibQuantError | None = None

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "digests": self.rows, **self.summary,
                "ok": self.error is None,
                "error": None if self.error is None else str(self.error)}


def digest(path) -> DigestReport:
    """Digests of a manifest (per entry shape), a dump (per tensor + file) or a compressed file."""
    path = untrusted.input_path(path)
    if path.suffix == ".json":
        manifest = load_manifest(path)
        rows = [{"name": f"entries[{i}] ({e.shape.role})", "tensors": list(e.tensors),
                 "digest": e.shape.digest()} for i, e in enumerate(manifest.entries)]
        return DigestReport(str(path), "manifest", rows)
    header = stfile.read_header(path)
    if not container.is_compressed(header):
        rows = []
        for name, info in header.tensors.items():
            rows.append({"name": name, "dtype": info.dtype, "shape": list(info.shape),
                         "digest": tensor_digest(info.dtype, info.shape,
                                                 stfile.read_raw(header, name))})
        whole = file_digest({r["name"]: r["digest"] for r in rows})
        return DigestReport(str(path), "dump", rows, {"file_digest": whole})
    comp = container.open_container(path)
    rep = DigestReport(str(path), "compressed", summary={
        "source_file_digest": comp.doc.source.file_digest,
        "document_digest": comp.header.metadata[container.KEY_DIGEST]})
    for name, recorded in comp.doc.arrays.items():
        try:
            container.verify_array(comp, name)
            status = "ok"
        except FibQuantError as err:
            status = "MISMATCH"
            rep.error = rep.error or err
        rep.rows.append({"name": name, "digest": recorded, "status": status})
    return rep


