"""The worker process's C allocator: memory a batch frees kept for the next batch.

glibc's malloc serves a request above its mmap threshold with pages of its own, mapped at
the request and unmapped at the free, and gives the top of its heap back to the kernel once
more than its trim threshold lies free there (both thresholds start at 128 KiB and rise,
the trim threshold to twice the mmap threshold, as large blocks are freed). A CPU batch
allocates and frees its activations block after block (on SmolLM2, 3,000-token batches:
up to 20 MB a tensor, ~100 MB at once), so every batch of a job touches fresh pages that
the kernel must fault in and zero: about 500 minor page faults per text, a few
microseconds each on a virtual machine, 5-10% of the batch.

`keep_freed_memory` sets both thresholds once for the process: requests up to glibc's
ceiling for the mmap threshold (32 MiB on 64-bit systems) come from the heap, and up to
`keep_bytes` of freed memory stays mapped there, so the next batch reuses pages already
faulted in. A worker's resident size then stays near its peak between batches instead of
falling back. Requests above 32 MiB (activations of models wider than SmolLM2 in large
batches) are still mapped and unmapped one by one. Other C libraries are left alone.
"""

import ctypes
import logging
import os

log = logging.getLogger("workers.allocator")

# mallopt's parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_MAX = 32 * 2**20


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # not a glibc system: the name is unknown there
        return False


def keep_freed_memory(keep_bytes: int) -> bool:
    """Serve requests up to 32 MiB from the heap and keep up to `keep_bytes` of freed memory
    mapped there for the rest of the process; False (nothing changed) where the C library
    is not glibc or `keep_bytes` is 0."""
    if keep_bytes <= 0 or not glibc():
        return False
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success; setting either threshold also stops glibc adjusting them
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) != 1 or libc.mallopt(M_TRIM_THRESHOLD, keep_bytes) != 1:
        log.warning("the C allocator refused its thresholds: freed memory goes back to the kernel as glibc decides")
        return False
    return True
