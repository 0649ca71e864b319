"""Layer ranges: one large dump's layers encoded by several Dask workers, written by one.

``RangeEncoder`` is an encoder for ``ops.compress.compress`` (its ``encoder`` argument): the
task that owns the dump runs compress as usual -- pre-pass, document, writer -- while the
layers, cut into runs of about ``split_bytes`` of source KV data, are encoded by
``encode_range`` tasks on any worker. It hands the EncodedLayers back in plan order, so the
writer, and so the file, are those of a single ``fibquant compress``. At most 2 x workers
ranges are in flight (bounded memory on the owner). Outside a Dask worker, or for a dump of
one range, it is ``encoded_layers`` itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path

from fibquant_cli.ops.progress import Progress


class RangeEncoder:
    def __init__(self, source: Path, split_bytes: int, *, in_worker: bool,
                 on_layer: Callable[[int], object] | None = None):
        self.source, self.split_bytes, self.in_worker = source, split_bytes, in_worker
        self.on_layer = on_layer  # called with each layer's index once it is yielded
        self.ranges = 1  # how many ranges the last call encoded as tasks

    def __call__(self, dump, quantizers, profiles, plans, compare, jobs):
        for i, layer in enumerate(self._layers(dump, quantizers, profiles, plans, compare, jobs)):
            yield layer
            if self.on_layer is not None:
                self.on_layer(i)

    def _layers(self, dump, quantizers, profiles, plans, compare, jobs):
        from fibquant_cli.ops.compress import encoded_layers

        ranges = layer_ranges(dump, plans, self.split_bytes)
        if len(ranges) < 2 or not self.in_worker:
            yield from encoded_layers(dump, quantizers, profiles, plans, compare, jobs)
            return
        from distributed import worker_client

        self.ranges = len(ranges)
        todo = deque(ranges)
        with worker_client() as client:  # secedes: this thread waits without holding a slot
            window = 2 * max(1, len(client.nthreads()))
            pending: deque = deque()

            def submit_next() -> None:
                if todo:
                    a, b = todo.popleft()
                    pending.append(client.submit(encode_range, str(self.source), profiles,
                                                 plans[a:b], compare, pure=False))

            for _ in range(window):
                submit_next()
            while pending:
                future = pending.popleft()
                layers = future.result()
                future.release()
                submit_next()
                yield from layers


def layer_ranges(dump, plans, split_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) runs of ``plans`` holding about ``split_bytes`` of source KV data each."""
    from fibquant_cli.core.layer import SOURCE_DTYPES
    from fibquant_cli.formats import dtypes

    ranges, start, size = [], 0, 0
    for i, plan in enumerate(plans):
        shape = dump.manifest.entries[plan.entry].shape
        itemsize = dtypes.numpy_dtype_for(SOURCE_DTYPES[shape.dtype]).itemsize
        size += shape.element_count // shape.layers * itemsize
        if size >= split_bytes:
            ranges.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(plans):
        ranges.append((start, len(plans)))
    return ranges


def encode_range(source: str, profiles, plans, compare: bool) -> list:
    """The EncodedLayers of ``plans`` (one range of the dump at ``source``), encoded here."""
    from fibquant_cli.formats.kvdump import open_dump
    from fibquant_cli.ops import process
    from fibquant_cli.ops.compress import encoded_layers
    from fibquant_cli.ops.compress_plan import make_quantizers

    process.start()
    dump = open_dump(source)
    quantizers = make_quantizers(profiles, Progress())
    return list(encoded_layers(dump, quantizers, profiles, plans, compare, 1))
