"""Where batch reads and writes: local paths, or fsspec URLs, and the stamps that make reruns skip.

Glossary:

* **location** -- a string: a local path (``dumps/``, ``/data/kv``), a ``file://`` URL (the same,
  through fsspec's spelling) or any other fsspec URL (``memory://``, ``s3://bucket/kv``,
  ``gcs://``...). Local locations never import fsspec; the others need the ``batch`` extra and,
  for object stores, that store's fsspec package (s3fs, gcsfs, adlfs).
* **staging** -- the ops read and write local files; for a remote location a worker downloads
  the input into a local temporary folder, runs the op there and uploads the output under a
  temporary name, then moves it over the output (atomic on file systems, one ``mv`` on object
  stores). Local outputs go through ``storage.publish.publishing`` like every other output.
* **stamp** -- a small JSON record per output, in ``OUT/.fibquant-stamps/``, written after the
  output: fibquant's version, the command, the options that decide the bytes, and for the input,
  its manifest and every output the size, the modification time and a SHA-256 of the content.
  An output is up to date when its stamp has the same version and options and every file still
  matches: same size and (same modification time or same content digest). A stale or missing
  stamp means the output is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from fibquant_cli import __version__
from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.storage.publish import publishing, temp_path_for

STAMP_DIR = ".fibquant-stamps"
STAMP_SCHEMA = "fibquant_batch_stamp_v1"
DIGEST_CHUNK = 8 << 20


def is_remote(location: str) -> bool:
    """True for fsspec URLs other than ``file://`` (those are local paths)."""
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> Path:
    return Path(location.removeprefix("file://"))


def _fs(location: str):
    """(fsspec file system, path inside it) of a remote location."""
    import fsspec

    return fsspec.core.url_to_fs(location)


def join(root: str, rel: str) -> str:
    """``rel`` (a '/'-separated relative path) under the folder ``root``."""
    if is_remote(root):
        return root.rstrip("/") + "/" + rel
    return str(local_path(root) / rel)


def check_folders(source: str, out: str | None) -> None:
    """IN must be a folder (else InvalidInputError, exit 3); OUT a folder or a new name (else
    UsageError, exit 2), created here."""
    if is_remote(source):
        fs, path = _fs(source)
        found, folder = fs.exists(path), fs.isdir(path)
    else:
        found, folder = local_path(source).exists(), local_path(source).is_dir()
    if not found:
        raise InvalidInputError("no such folder", path=source)
    if not folder:
        raise InvalidInputError("not a folder (batch takes a folder of dumps)", path=source)
    if out is None:
        return
    if is_remote(out):
        fs, path = _fs(out)
        if fs.exists(path) and not fs.isdir(path):
            raise UsageError("output folder is a file", path=out)
        fs.makedirs(path, exist_ok=True)
        return
    path = local_path(out)
    if path.exists() and not path.is_dir():
        raise UsageError("output folder is a file", path=out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output folder: {err.strerror or err}", path=out) from None


def list_files(root: str, suffix: str) -> list[str]:
    """Relative '/'-separated paths of the files under ``root`` ending in ``suffix``, sorted;
    hidden folders and files (stamps, temporaries) are left out."""
    found = []
    if is_remote(root):
        fs, base = _fs(root)
        base = base.rstrip("/")
        for path in fs.find(base):
            rel = path[len(base):].lstrip("/")
            if rel.endswith(suffix) and not any(p.startswith(".") for p in rel.split("/")):
                found.append(rel)
        return sorted(found)
    base = local_path(root)
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.endswith(suffix) and not name.startswith("."):
                found.append((Path(folder) / name).relative_to(base).as_posix())
    return sorted(found)


# --------------------------------------------------------------------------- file facts


def file_info(location: str) -> tuple[int, str] | None:
    """(size, modification key) of a regular file, None when there is none."""
    if is_remote(location):
        fs, path = _fs(location)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        for key in ("mtime", "LastModified", "last_modified", "updated", "created", "ETag"):
            if info.get(key) is not None:
                return int(info["size"]), str(info[key])
        return int(info["size"]), ""
    try:
        st = os.stat(local_path(location))
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, str(st.st_mtime_ns)


def content_digest(location: str) -> str:
    """'sha256:<hex>' of a file's bytes (hashlib: fast, and in the standard library)."""
    h = hashlib.sha256()
    opener = _fs(location)[0].open if is_remote(location) else open
    path = _fs(location)[1] if is_remote(location) else local_path(location)
    with opener(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def fingerprint(location: str) -> dict | None:
    """What a stamp records of a file: size, modification key, content digest."""
    info = file_info(location)
    if info is None:
        return None
    return {"size": info[0], "mtime": info[1], "sha256": content_digest(location)}


def still_matches(recorded: dict | None, location: str, *, hash_on_doubt: bool) -> bool:
    """The file is the one recorded: same size and same modification key, or (when the key
    changed and ``hash_on_doubt``) the same content digest."""
    info = file_info(location)
    if not isinstance(recorded, dict) or info is None or info[0] != recorded.get("size"):
        return False
    if info[1] == recorded.get("mtime"):
        return True
    return hash_on_doubt and content_digest(location) == recorded.get("sha256")


# --------------------------------------------------------------------------- stamps


def stamp_location(out_root: str, rel_output: str) -> str:
    return join(out_root, f"{STAMP_DIR}/{rel_output}.json")


def read_stamp(location: str) -> dict | None:
    """The stamp at ``location``; None when missing or unreadable (then the output is redone)."""
    try:
        if is_remote(location):
            fs, path = _fs(location)
            text = fs.cat_file(path).decode()
        else:
            text = local_path(location).read_text(encoding="utf-8")
        obj = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and obj.get("schema") == STAMP_SCHEMA else None


def make_stamp(kind: str, options: dict, inputs: list[str], outputs: list[str],
               result: dict) -> dict:
    """The stamp of outputs just written from inputs (files recorded by position, not by
    name, so a folder reached by another path or mount still matches)."""
    return {"schema": STAMP_SCHEMA, "fibquant": __version__, "kind": kind,
            "options": json.loads(json.dumps(options)),
            "inputs": [fingerprint(loc) for loc in inputs],
            "outputs": [fingerprint(loc) for loc in outputs], "result": result}


def stamp_is_current(stamp: dict | None, kind: str, options: dict, inputs: list[str],
                     outputs: list[str], *, hash_on_doubt: bool) -> bool:
    """Every input and output still matches ``stamp``, made by this version with ``options``."""
    if (stamp is None or stamp.get("fibquant") != __version__ or stamp.get("kind") != kind
            or stamp.get("options") != json.loads(json.dumps(options))):
        return False
    recorded_in, recorded_out = stamp.get("inputs"), stamp.get("outputs")
    if not (isinstance(recorded_in, list) and len(recorded_in) == len(inputs)
            and isinstance(recorded_out, list) and len(recorded_out) == len(outputs)):
        return False
    return all(still_matches(rec, loc, hash_on_doubt=hash_on_doubt)
               for rec, loc in zip(recorded_in + recorded_out, inputs + outputs))


def write_text(location: str, text: str) -> None:
    """Write a small text file atomically (publishing locally; temporary name, then mv)."""
    if is_remote(location):
        fs, path = _fs(location)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = _remote_temp(path)
        fs.pipe_file(tmp, text.encode())
        fs.mv(tmp, path)
        return
    path = local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    with publishing([path], force=True) as (tmp,):
        tmp.write_text(text, encoding="utf-8")


def _remote_temp(path: str) -> str:
    folder, _, _ = path.rpartition("/")
    return f"{folder}/{temp_path_for(Path(path)).name}" if folder else temp_path_for(Path(path)).name


# --------------------------------------------------------------------------- staging


def download(location: str, local: Path) -> None:
    """Copy a remote file to ``local`` (a missing one raises InvalidInputError, exit 3)."""
    fs, path = _fs(location)
    if not fs.exists(path):
        raise InvalidInputError("no such file", path=location)
    fs.get_file(path, str(local))


def upload(local: Path, location: str) -> None:
    """Put ``local`` at the remote ``location``: under a temporary name, then one move."""
    fs, path = _fs(location)
    folder = path.rsplit("/", 1)[0]
    if folder:
        fs.makedirs(folder, exist_ok=True)
    tmp = _remote_temp(path)
    try:
        fs.put_file(str(local), tmp)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

