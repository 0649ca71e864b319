"""ops/process: freed memory is kept for reuse, so a codec's per-layer arrays stop faulting;
BLAS starts no threads of its own, so none spins after a product."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from fibquant_cli.ops.process import keep_freed_memory
changed = keep_freed_memory() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def layer():  # what a codec does per layer: a few arrays of megabytes, written, freed
    return [np.ones(3 << 17) for _ in range(4)]  # 3 MiB each
for _ in range(3):  # warm: numpy, the heap
    layer()
before = faults()
for _ in range(10):
    layer()
print(changed, faults() - before)
"""


def probe(mode: str, **env) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_arrays_are_reused_without_page_faults():
    changed, tuned = probe("tuned")
    _, default = probe("default")
    assert changed
    assert default > 10 * 3 * 256  # most of the 12 MiB faulted in again per layer (4 KiB pages)
    assert tuned < default / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_users_own_malloc_settings_are_left_alone():
    changed, _ = probe("tuned", MALLOC_TRIM_THRESHOLD_="65536")
    assert not changed


BLAS_PROBE = """
import resource, sys, time
from fibquant_cli.ops import process
if sys.argv[1] == "numpy first":
    import numpy
changed = process.blas_without_threads() if sys.argv[1] != "default" else False
import numpy as np
from threadpoolctl import threadpool_info
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
u = np.ones((400, 400), dtype=np.float32)
u @ u  # a product as a basis check makes; OpenBLAS's threads would now spin
before = cpu()
time.sleep(0.5)
blas = [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]
print(changed, blas[0] if blas else -1, round((cpu() - before) * 1000))
"""


def blas_probe(mode: str, **env) -> tuple[bool, int, int]:
    # OpenBLAS also reads OMP_NUM_THREADS, which dask sets in this process (test_batch)
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", BLAS_PROBE, mode], capture_output=True,
                         text=True, check=True, env={**environ, **env}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_blas_starts_no_threads_so_none_spins_after_a_product():
    changed, threads, idle_ms = blas_probe("tuned")
    if threads == -1:
        pytest.skip("numpy is not linked to OpenBLAS here")
    assert changed and threads == 1
    assert idle_ms < 40  # asleep: with OpenBLAS's own threads one spun ~110 ms of the 500
    if (os.cpu_count() or 1) > 1:
        assert blas_probe("default")[1] > 1  # the setting is what made the difference


def test_a_users_own_blas_threads_and_a_late_call_are_left_alone():
    changed, threads, _ = blas_probe("tuned", OPENBLAS_NUM_THREADS="2")
    assert not changed and threads in (2, -1)
    changed, threads, _ = blas_probe("numpy first")
    assert not changed



LIMIT_PROBE = """
import json
import threadpoolctl
import numpy as np
from fibquant_cli.ops import process
def blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"]
before = blas_threads()
inside, controllers = [], set()
for _ in range(3):
    with process.one_blas_thread():
        inside += blas_threads()
        controllers.add(id(process._controller))
print(json.dumps([before, inside, blas_threads(), len(controllers)]))
"""


def test_one_blas_thread_limits_and_restores_listing_libraries_once():
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", LIMIT_PROBE], capture_output=True, text=True,
                         check=True, env={**environ, "OPENBLAS_NUM_THREADS": "2"}).stdout
    before, inside, after, made = json.loads(out)
    if not before:
        pytest.skip("numpy is linked to no BLAS threadpoolctl knows here")
    assert before == after == [2] and inside == [1, 1, 1]
    assert made == 1  # one controller: listing the libraries is what costs
