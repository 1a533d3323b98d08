"""How a pipeline process asks the C allocator to keep the memory it frees.

A 2048 x 4096 float32 plane is 32 MiB; glibc's ``malloc`` serves every block that large with a
fresh ``mmap`` and hands it back to the kernel on ``free``, so each full-frame temporary costs
a first touch of every page.  NumPy also advises the kernel to back such blocks with huge pages
(``madvise(MADV_HUGEPAGE)``); where the kernel compacts memory synchronously for that advice
(``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``, the Debian default) and its
memory is fragmented after days of uptime, a first touch costs 3-4 ms per MiB: on this project's
test machine the subtraction of a 2048 x 4096 pair spent 1.4 of its 3.7 s there.

`keep_freed_memory` sets two documented ``mallopt`` parameters (``man 3 mallopt``): blocks up
to 1 GiB come from the heap (``M_MMAP_THRESHOLD``), and freed heap memory is kept for the next
image (``M_TRIM_THRESHOLD``).  The process's memory then stays at its peak between images
instead of being returned and faulted in again.  The ``seechange`` command calls it; a
library import does not (a notebook's memory is its owner's business), but a script that runs
many images may call it first.  It is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_HEAP_BLOCK = 1 << 30
_KEEP = (1 << 31) - 1            # the largest int: never trim


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Keep large freed blocks in the process for reuse (glibc only; see the module docstring).

    Returns
    -------
    bool
        True if both settings were accepted, False where there is no glibc ``mallopt``.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):     # musl, macOS: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
