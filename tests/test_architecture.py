"""The layers import only downward, and start-up imports only what a command needs.

Layers, top to bottom: cli -> hf (real models, torch) -> api (the Python API) -> ops ->
formats, storage -> codecs -> core -> errors (docs/architecture.md). Read from the source
with ``ast``, lazy imports inside functions included, so a shortcut anywhere in a module counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fibquant_cli"
STDLIB = set(sys.stdlib_module_names)
# What each layer may import from the project (besides itself).
ALLOWED = {
    "errors": set(),
    "core": {"errors"},
    "codecs": {"core", "errors"},
    "formats": {"codecs", "core", "errors"},
    "storage": {"formats", "codecs", "core", "errors"},
    "ops": {"storage", "formats", "codecs", "core", "errors", "__init__"},
    "api": {"ops", "storage", "formats", "codecs", "core", "errors"},
    "hf": {"api", "ops", "storage", "formats", "codecs", "core", "errors"},
    "cli": {"hf", "api", "ops", "storage", "formats", "codecs", "core", "errors"},
}
# Third-party packages each layer may import (core and codecs: numpy only).
THIRD_PARTY = {
    "errors": set(),
    "core": {"numpy"},
    "codecs": {"numpy"},
    "formats": {"numpy", "blake3", "ml_dtypes", "gguf"},
    "storage": {"numpy"},
    "ops": {"numpy", "threadpoolctl", "dask", "distributed", "fsspec"},  # the last 3: ops/batch
    "api": {"numpy", "ml_dtypes", "threadpoolctl"},  # torch tensors are converted, never imported
    "hf": {"numpy", "ml_dtypes", "safetensors", "torch", "transformers", "tokenizers",
           "gguf"},  # the hf extra: transformers reads GGUF files through it
    "cli": {"typer", "rich", "matplotlib"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        layer = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem
        yield path, layer


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "fibquant_cli":
                yield node.module
            else:  # from fibquant_cli import codecs / __version__
                subpackages = {p.stem for p in PACKAGE.iterdir()}
                yield from (f"fibquant_cli.{a.name}" if a.name in subpackages else
                            "fibquant_cli.__init__" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import (use fibquant_cli....)")


@pytest.mark.parametrize("path, layer", [pytest.param(p, layer, id=str(p.relative_to(PACKAGE)))
                                         for p, layer in _modules() if layer in ALLOWED])
def test_each_layer_imports_only_downward(path, layer):
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "fibquant_cli":
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            assert target == layer or target in ALLOWED[layer], f"{path.name} imports {name}"
        else:
            assert top in STDLIB or top in THIRD_PARTY[layer], f"{path.name} imports {name}"


def _loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_cli_loads_no_numerics():
    """``fibquant --help`` must start fast: no numpy, ml_dtypes, blake3, rich or numeric core."""
    loaded = _loaded_by("import fibquant_cli.cli")
    heavy = {"numpy", "ml_dtypes", "blake3", "rich", "safetensors", "threadpoolctl", "scipy",
             "dask", "distributed", "fsspec"}
    assert not heavy & loaded, sorted(heavy & loaded)
    project = {m for m in loaded if m.startswith("fibquant_cli.")}
    assert project <= {"fibquant_cli.cli", "fibquant_cli.cli.app", "fibquant_cli.cli.console",
                       "fibquant_cli.cli.batch",
                       "fibquant_cli.cli.progress", "fibquant_cli.cli.errors",
                       "fibquant_cli.cli.options", "fibquant_cli.errors", "fibquant_cli.ops",
                       "fibquant_cli.ops.progress"}, sorted(project)


def test_digest_of_an_f16_dump_does_not_load_ml_dtypes_or_the_codec(tmp_path):
    from conftest import make_dump

    dump = make_dump(tmp_path)
    loaded = _loaded_by("import sys; sys.argv = ['fibquant', 'digest', %r]\n"
                        "from fibquant_cli.cli import app\n"
                        "try:\n    app(prog_name='fibquant')\nexcept SystemExit:\n    pass"
                        % str(dump.path))
    assert "blake3" in loaded  # it did compute digests
    assert not {"ml_dtypes", "fibquant_cli.core.codec", "fibquant_cli.core.fastsearch"} & loaded
