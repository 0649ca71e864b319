"""Process-wide settings made once at start-up (the command line, batch workers, benchmarks).

**glibc keeps freed memory.** By default glibc hands freed memory back to the kernel: blocks
above the mmap threshold are unmapped, and the heap's top is trimmed past 128 KiB. A codec
allocates fresh multi-megabyte arrays for every layer (the decoded rows, the output, the
coefficients), so each of them is page-faulted in again: decoding the 18.9 MB benchmark dump
took 18,700 minor faults per run, and removing them made the transform decode 1.4x faster
(198 -> 141 ms). ``keep_freed_memory`` serves blocks up to 32 MiB from the heap and keeps up to
256 MiB of freed memory for reuse; the peak memory is unchanged, it is only not returned before
the process ends. A no-op off glibc, and where the user (or a scheduler) set
``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_`` themselves.

**BLAS starts no threads.** fibquant runs its own threads over layers, and every heavy product
already runs on one BLAS thread (``one_blas_thread``: for small matrices BLAS threads only add
hand-off cost, and one thread rounds the same every time). But OpenBLAS starts its worker
threads when numpy loads, and after any product they did run (a basis check opening a file,
say) they spin for about 0.1 s before sleeping: a core taken from the decode that follows.
Decoding the benchmark dump into memory used 0.30 s of CPU with them and 0.20 s without.
``blas_without_threads`` sets ``OPENBLAS_NUM_THREADS=1`` before numpy loads (numpy's wheels
bundle OpenBLAS), unless the user chose a number; torch's threads (``eval --model``) are not
OpenBLAS's and keep theirs.

**One BLAS thread, cheaply.** ``one_blas_thread`` is ``threadpool_limits(1)`` from one
``ThreadpoolController`` made per process: making one lists every loaded shared library (0.7 ms
here), and ``api.decompress`` took ten limits (one per tensor read), 7 ms of a 110 ms decode,
holding the GIL the decoding threads wanted. Libraries loaded after the first call (torch's)
are not limited by it; fibquant's products are numpy's.
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 256 << 20
BLAS_THREADS = "OPENBLAS_NUM_THREADS"
_done = False
_controller = None


def start() -> None:
    """Both settings below; call first thing, before numpy is imported."""
    blas_without_threads()
    keep_freed_memory()


def blas_without_threads() -> bool:
    """``OPENBLAS_NUM_THREADS=1`` for this process and its children; True if set here. Too
    late (False) once numpy is loaded, or when the user set the variable."""
    if BLAS_THREADS in os.environ or "numpy" in sys.modules:
        return False
    os.environ[BLAS_THREADS] = "1"
    return True


def keep_freed_memory() -> bool:
    """Tune glibc once per process; True if this call changed the settings."""
    global _done
    if _done or any(os.environ.get(v) for v in ("MALLOC_TRIM_THRESHOLD_",
                                                  "MALLOC_MMAP_THRESHOLD_")):
        return False
    _done = True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def one_blas_thread():
    """A context manager in which the BLAS and OpenMP libraries loaded so far use one thread
    (``threadpoolctl``'s ``limit``), restored on exit; the libraries are listed once."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()  # threads may make two: the same lists
    return _controller.limit(limits=1)
