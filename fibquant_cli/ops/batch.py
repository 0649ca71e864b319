"""batch: every file of a folder as one task on Dask's distributed scheduler.

Glossary:

* **task** -- one input file of IN and what to do with it (compress, decompress, validate):
  a ``Task`` holds locations (paths or URLs) and the spec, never data, so it is a few hundred
  bytes on the wire; the worker reads the input from the shared file system or object store.
* **cluster** -- a ``distributed.LocalCluster`` of ``workers`` processes with one thread each
  (each task already uses a core), or an existing scheduler at ``scheduler``'s address.
* **layer range** -- a run of consecutive layers of one dump. A compress task whose dump holds
  more than ``split_bytes`` of KV data encodes its layer ranges as further tasks on any worker
  (``ops.batch_ranges``) and writes their results in order into the one output itself, through the
  same ``ops.compress`` code as a single ``fibquant compress`` (the ``encoder`` hook), so the
  file is byte-identical. Ranges of remote (non-local) inputs are not split: a range task would
  have to download the whole dump again.
* **stamp** -- what makes a rerun skip an output that is up to date (``ops.batch_files``).

Every task ends as a ``TaskResult``: "done", "skipped" (up to date), "failed" (with the file and
the reason; the others go on) or, for validate, "ok". A worker that dies mid-task (killed, out of
memory) leaves no output (writes are atomic) and the scheduler runs its task again elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fibquant_cli import __version__
from fibquant_cli.errors import FibQuantError, InvalidInputError, OutputExistsError, UsageError
from fibquant_cli.ops import batch_files as files
from fibquant_cli.ops.batch_ranges import RangeEncoder
from fibquant_cli.ops.progress import Progress
from fibquant_cli.ops.spec import CompressSpec

KINDS = ("compress", "decompress", "validate")
SUMMARY_NAME = "fibquant-batch.json"
SUMMARY_SCHEMA = "fibquant_batch_summary_v1"
DUMP_SUFFIX = ".safetensors"
COMPRESSED_SUFFIX = ".fq.safetensors"
# Names compress-all and decompress write beside dumps: never inputs of batch compress.
NOT_DUMPS = (COMPRESSED_SUFFIX, ".restored.safetensors")
DEFAULT_SPLIT_BYTES = 256 << 20
SCHEDULER_TIMEOUT = "10s"  # to connect to --scheduler
# Test hook: with this set to a folder, a compress task whose input is NAME exits its worker
# process (as a kill would) once, after writing a layer, when NAME.crash-once exists there (the
# file is removed first).
CRASH_ONCE_ENV = "FIBQUANT_BATCH_CRASH_ONCE"


@dataclass(frozen=True)
class Task:
    kind: str
    name: str  # the input's path relative to IN ('/'-separated)
    source: str  # location of the input
    outputs: tuple[str, ...] = ()  # locations of the outputs (a dump and its manifest)
    stamp: str | None = None
    spec: CompressSpec | None = None
    attention: bool = True
    force: bool = False
    split_bytes: int = DEFAULT_SPLIT_BYTES
    basis: str | None = None  # decompress, validate: the basis transform-coded files need
    own_basis: str | None = None  # compress: ops.compress's own_basis

    @property
    def manifest(self) -> str | None:
        """The manifest beside a dump (compress reads it; the stamp records it)."""
        if self.kind != "compress":
            return None
        return self.source.removesuffix(DUMP_SUFFIX) + ".manifest.json"

    @property
    def options(self) -> dict:
        """What decides the output's bytes (recorded in the stamp)."""
        if self.spec is None:
            return {}
        mode = {} if self.own_basis in (None, "never") else {"own_basis": self.own_basis}
        return {**self.spec.to_json(), **mode}

    @property
    def inputs(self) -> list[str]:
        """What decides the output besides the options: the dump, its manifest and, for the
        transform codec, the basis file (a changed basis redoes the output)."""
        basis = self.spec.basis if self.spec is not None else None
        return ([self.source] + ([self.manifest] if self.manifest else [])
                + ([basis] if basis else []))


@dataclass
class TaskResult:
    name: str
    status: str  # done, skipped, failed (compress, decompress); ok, failed (validate)
    output: str | None = None
    ratio: float | None = None
    rel_mse: float | None = None
    seconds: float = 0.0
    ranges: int = 1  # layer ranges encoded as separate tasks (1: not split)
    error: str | None = None  # one line, options named by parameter ({force})
    error_options: tuple[str, ...] = ()
    worker: str | None = None

    def message(self, name_option=str) -> str | None:
        """The error line with ``{option}`` placeholders filled by ``name_option``."""
        if self.error is None:
            return None
        return self.error.format(**{o: name_option(o) for o in self.error_options})

    def to_json(self) -> dict:
        out = asdict(self)
        out["error"] = self.message()
        del out["error_options"]
        return out


@dataclass
class BatchReport:
    kind: str
    source: str
    output: str | None
    workers: int | str
    seconds: float
    results: list[TaskResult] = field(default_factory=list)
    summary: str | None = None  # where the JSON summary was written

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[TaskResult]:
        return [r for r in self.results if r.status == "failed"]

    def to_json(self) -> dict:
        return {"schema": SUMMARY_SCHEMA, "fibquant": __version__, "kind": self.kind,
                "input": self.source, "output": self.output, "workers": self.workers,
                "seconds": round(self.seconds, 3),
                "counts": {s: self.count(s) for s in ("done", "ok", "skipped", "failed")},
                "tasks": [r.to_json() for r in self.results]}


# --------------------------------------------------------------------------- planning


def plan_tasks(kind: str, source: str, out: str | None, *, spec: CompressSpec | None = None,
               attention: bool = True, force: bool = False,
               split_bytes: int = DEFAULT_SPLIT_BYTES, basis: str | None = None,
               own_basis: str | None = None) -> list[Task]:
    """One task per input file under ``source``, outputs at the same relative path in ``out``."""
    if kind not in KINDS:
        raise UsageError(f"unknown batch command {kind!r}; one of {', '.join(KINDS)}")
    if kind != "validate" and out is None:
        raise UsageError(f"batch {kind} needs an output folder")
    files.check_folders(source, out)
    suffix = COMPRESSED_SUFFIX if kind == "decompress" else DUMP_SUFFIX
    names = files.list_files(source, suffix)
    if kind == "compress":
        names = [n for n in names if not n.endswith(NOT_DUMPS)]
    if not names:
        raise InvalidInputError(f"no *{suffix} files in this folder", path=source)
    tasks = []
    for name in names:
        outputs: tuple[str, ...] = ()
        if kind == "compress":
            outputs = (name.removesuffix(DUMP_SUFFIX) + COMPRESSED_SUFFIX,)
        elif kind == "decompress":  # the dump again, under its own name, with its manifest
            stem = name.removesuffix(COMPRESSED_SUFFIX)
            outputs = (stem + DUMP_SUFFIX, stem + ".manifest.json")
        tasks.append(Task(
            kind, name, files.join(source, name), tuple(files.join(out, o) for o in outputs),
            files.stamp_location(out, outputs[0]) if outputs else None,
            spec=spec if kind == "compress" else None, attention=attention, force=force,
            split_bytes=split_bytes, basis=basis if kind != "compress" else None,
            own_basis=own_basis if kind == "compress" else None))
    return tasks


def up_to_date(task: Task, *, hash_on_doubt: bool) -> dict | None:
    """The stamp of ``task``'s output when it is current, else None."""
    if task.stamp is None:
        return None
    stamp = files.read_stamp(task.stamp)
    if files.stamp_is_current(stamp, task.kind, task.options, task.inputs, list(task.outputs),
                              hash_on_doubt=hash_on_doubt):
        return stamp
    return None


def skipped(task: Task, stamp: dict) -> TaskResult:
    previous = stamp.get("result") or {}
    return TaskResult(task.name, "skipped", task.outputs[0], ratio=previous.get("ratio"),
                      rel_mse=previous.get("rel_mse"), ranges=previous.get("ranges", 1))


# --------------------------------------------------------------------------- one task


def run_task(task: Task) -> TaskResult:
    """Do one task on this worker; every error becomes a "failed" result naming file and reason."""
    from fibquant_cli.ops import process

    process.start()  # once per worker process, as the command line does
    start = time.perf_counter()
    try:
        stamp = None if task.force else up_to_date(task, hash_on_doubt=False)
        if stamp is None and not task.force:
            stamp = up_to_date(task, hash_on_doubt=True)
            if stamp is not None:  # touched, same bytes: record the new times
                _write_stamp(task, stamp["result"])
        if stamp is not None:
            return replace(skipped(task, stamp), seconds=time.perf_counter() - start,
                           worker=_worker_name())
        if not task.force and task.stamp is not None and files.read_stamp(task.stamp) is None:
            for loc in task.outputs:  # not written by batch (no stamp): keep it
                if files.file_info(loc) is not None:
                    raise OutputExistsError(path=loc)
        with _staged(task) as (source, outputs, unstage):
            result = _RUNNERS[task.kind](task, source, outputs)
            unstage()
        if task.stamp is not None:
            _write_stamp(task, {"ratio": result.ratio, "rel_mse": result.rel_mse,
                                "ranges": result.ranges})
    except FibQuantError as err:
        result = TaskResult(task.name, "failed", error=_error_line(err, task),
                            error_options=err.options)
    except Exception as err:  # a bug or an OS error: still one line, and the others go on
        result = TaskResult(task.name, "failed", error=f"{task.source}: internal error: "
                            f"{type(err).__name__}: {err}")
    result.seconds = time.perf_counter() - start
    result.worker = _worker_name()
    return result


def _compress(task: Task, source: Path, outputs: list[Path]) -> TaskResult:
    from fibquant_cli.ops.compress import compress

    encoder = None
    if not files.is_remote(task.source):  # remote dumps are not split (a range would download all)
        encoder = RangeEncoder(source, task.split_bytes, in_worker=_worker_name() is not None,
                               on_layer=lambda i: i == 1 and _crash_once(task))
    rep = compress(source, output=outputs[0], spec=task.spec, attention=task.attention,
                   force=True, jobs=1, encoder=encoder,  # run_task kept foreign outputs
                   own_basis=task.own_basis)
    return TaskResult(task.name, "done", task.outputs[0], ratio=rep.total.ratio,
                      rel_mse=rep.total.rel_mse, ranges=encoder.ranges if encoder else 1)


def _decompress(task: Task, source: Path, outputs: list[Path]) -> TaskResult:
    from fibquant_cli.ops.decompress import decompress

    decompress(source, output=outputs[0], force=True, jobs=1,  # run_task kept foreign outputs
               basis=task.basis)
    ratio = outputs[0].stat().st_size / source.stat().st_size  # restored / compressed
    return TaskResult(task.name, "done", task.outputs[0], ratio=ratio)


def _validate(task: Task, source: Path, outputs: list[Path]) -> TaskResult:
    from fibquant_cli.ops.inspect import validate

    rep = validate(source, basis=task.basis)
    if rep.error is not None:
        raise rep.error
    return TaskResult(task.name, "ok")


_RUNNERS = {"compress": _compress, "decompress": _decompress, "validate": _validate}


@contextlib.contextmanager
def _staged(task: Task):
    """Local paths for the task's input and outputs, and a function that publishes the outputs.

    Local locations are used as they are (the ops publish atomically themselves). Remote ones
    are downloaded into a temporary folder, and the outputs uploaded from it by ``unstage``.
    """
    if not files.is_remote(task.source) and not any(map(files.is_remote, task.outputs)):
        for out in task.outputs:
            files.local_path(out).parent.mkdir(parents=True, exist_ok=True)
        yield files.local_path(task.source), [files.local_path(o) for o in task.outputs], \
            lambda: None
        return
    folder = Path(tempfile.mkdtemp(prefix="fibquant-batch-"))
    try:
        if files.is_remote(task.source):
            source = folder / "in" / Path(task.name).name
            source.parent.mkdir()
            for loc, local in zip(task.inputs, (source, source.with_suffix(".manifest.json"))):
                if loc == task.manifest and files.file_info(loc) is None:
                    continue  # compress names the missing manifest
                files.download(loc, local)
        else:
            source = files.local_path(task.source)
        (folder / "out").mkdir()
        # Local outputs are written in place (published atomically by the op), remote ones
        # staged here and uploaded by unstage.
        outputs = [folder / "out" / o.rsplit("/", 1)[-1] if files.is_remote(o)
                   else files.local_path(o) for o in task.outputs]
        for out in outputs:
            out.parent.mkdir(parents=True, exist_ok=True)

        def unstage():
            for local, loc in zip(outputs, task.outputs):
                if files.is_remote(loc):
                    files.upload(local, loc)

        try:
            yield source, outputs, unstage
        except FibQuantError as err:  # name the URLs, not the staged copies
            raise type(err)(_unstaged_text(err.reason, folder, task), options=err.options,
                            path=_unstaged_text(err.path, folder, task), tensor=err.tensor,
                            field=err.field) from None
    finally:
        files.remove_tree(folder)


def _unstaged_text(text: str | None, folder: Path, task: Task) -> str | None:
    if text is None:
        return None
    for loc in task.outputs:
        text = text.replace(str(folder / "out" / loc.rsplit("/", 1)[-1]), loc)
    return text.replace(str(folder / "in" / Path(task.name).name), task.source)


def _error_line(err: FibQuantError, task: Task) -> str:
    """The error as one line that names the file (the input when the error names none)."""
    if err.path is None:
        err = err.at(path=task.source)
    return " ".join(err.render(lambda o: "{" + o + "}").split())


def _write_stamp(task: Task, result: dict) -> None:
    stamp = files.make_stamp(task.kind, task.options, task.inputs, list(task.outputs), result)
    files.write_text(task.stamp, json.dumps(stamp, indent=1) + "\n")


def _worker_name() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _crash_once(task: Task) -> None:  # called after the first layer is written
    folder = os.environ.get(CRASH_ONCE_ENV)
    if not folder:
        return
    trigger = Path(folder) / (Path(task.name).name + ".crash-once")
    try:
        trigger.unlink()
    except FileNotFoundError:
        return
    os._exit(70)  # as a kill would: no cleanup, no result


# --------------------------------------------------------------------------- the batch


def run_batch(kind: str, source: str, out: str | None = None, *,
              spec: CompressSpec | None = None, attention: bool = True, force: bool = False,
              workers: int = 0, scheduler: str | None = None, client=None,
              split_bytes: int = DEFAULT_SPLIT_BYTES, basis: str | None = None,
              own_basis: str | None = None, progress: Progress | None = None) -> BatchReport:
    """Run ``kind`` on every file under ``source`` on a Dask cluster; the summary is written to
    ``out``/fibquant-batch.json (when there is an ``out``).

    ``client`` (a ``distributed.Client``) is used as it is; else ``scheduler`` is the address of
    a running scheduler; else a local cluster of ``workers`` processes (0: one per core) is
    started and stopped here. Outputs already up to date are skipped before any cluster starts.
    ``basis``: for decompress and validate, the basis file transform-coded files need (a
    transform ``spec`` carries its own); it must be where every worker can read it.
    ``own_basis``: for compress without a basis, as ``ops.compress`` (a dump that takes its
    own basis is encoded by its own task, not in layer ranges).
    """
    start = time.perf_counter()
    progress = progress or Progress()
    if workers < 0:
        raise UsageError(f"{{workers}} must be >= 0, got {workers}", options=("workers",))
    if split_bytes < 1:
        raise UsageError(f"{{split_bytes}} must be >= 1, got {split_bytes}",
                         options=("split_bytes",))
    spec = spec or (CompressSpec() if kind == "compress" else None)
    if kind == "compress":
        from fibquant_cli.ops.own_basis import check_mode

        check_mode(own_basis, spec)
    tasks = plan_tasks(kind, source, out, spec=spec, attention=attention, force=force,
                       split_bytes=split_bytes, basis=basis, own_basis=own_basis)
    results: dict[str, TaskResult] = {}
    todo = []
    for task in tasks:  # the cheap check (sizes, times): a rerun starts no cluster at all
        stamp = None if force else up_to_date(task, hash_on_doubt=False)
        if stamp is not None:
            results[task.name] = skipped(task, stamp)
        else:
            todo.append(task)
    n_workers: int | str = 0
    if todo:
        with _cluster(client, scheduler, workers) as (dask_client, n_workers):
            progress.start(len(tasks), f"batch {kind} ({len(todo)} to do on {n_workers} "
                           f"worker{'s' if n_workers != 1 else ''})")
            for _ in results:
                progress.advance("skipped")
            for task, result in _run_all(dask_client, todo):
                results[task.name] = result
                progress.advance(task.name)
    rep = BatchReport(kind, source, out, n_workers, 0.0, [results[t.name] for t in tasks])
    rep.seconds = time.perf_counter() - start
    if out is not None:
        rep.summary = files.join(out, SUMMARY_NAME)
        files.write_text(rep.summary, json.dumps(rep.to_json(), indent=2, allow_nan=False) + "\n")
    return rep


def _run_all(client, tasks):
    """Yield (task, result) as tasks finish; a lost task (its worker died too often) fails."""
    from distributed import as_completed

    futures = {client.submit(run_task, task, pure=False, key=f"fibquant-{task.kind}-{i}-"
                             f"{os.urandom(4).hex()}"): task for i, task in enumerate(tasks)}
    for future in as_completed(futures, loop=client.loop):
        task = futures[future]
        try:
            result = future.result()
        except Exception as err:  # KilledWorker, CancelledError, a lost scheduler
            result = TaskResult(task.name, "failed",
                                error=f"{task.source}: task lost: {type(err).__name__}: {err}")
        future.release()
        yield task, result


@contextlib.contextmanager
def _cluster(client, scheduler: str | None, workers: int):
    """(client, its worker count): the given client, one of ``scheduler``, or a local cluster."""
    if client is not None:
        yield client, len(client.nthreads())
        return
    try:
        import distributed
    except ImportError:
        raise UsageError("fibquant batch needs the batch extra: pip install 'fibquant[batch]'")\
            from None
    if scheduler is not None:
        try:
            made = distributed.Client(scheduler, timeout=SCHEDULER_TIMEOUT,
                                      set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise UsageError(f"cannot reach the scheduler at {scheduler}: {err}",
                             options=("scheduler",)) from None
        with made:
            yield made, len(made.nthreads())
        return
    import logging
    import multiprocessing
    import warnings

    import dask

    n = workers or os.cpu_count() or 1
    key = "distributed.worker.multiprocessing-method"
    # Workers start from a fork server that has imported distributed and numpy once, not from
    # a fresh interpreter each (dask's default, spawn): 2 workers were up in 1.4 s, not 2.8 s,
    # measured on 2 cores. Plain fork would be faster still but copies this process's threads.
    method = ("forkserver" if dask.config.get(key) == "spawn"
              and "forkserver" in multiprocessing.get_all_start_methods() else dask.config.get(key))
    # Dask sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which turns off glibc's adaptive
    # mmap threshold: every large numpy temporary is then mapped and unmapped afresh, and a
    # compress task ran 1.5-2x slower in a worker than in a plain process (measured). Unset.
    with dask.config.set({key: method,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        with warnings.catch_warnings():  # "port 8787 in use": its HTTP server takes another
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               silence_logs=logging.ERROR)
        with cluster, distributed.Client(cluster, set_as_default=False) as made:
            yield made, n
