"""util.memory: a pipeline process keeps freed full-frame blocks instead of faulting them in again."""

import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    if sys.argv[1] == "keep":
        from util.memory import keep_freed_memory
        assert keep_freed_memory()
    def faults_of_one_plane():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        plane = np.ones((4096, 2048), dtype=np.float64)   # 64 MiB, a full-frame temporary
        del plane
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_plane()
    print(max(faults_of_one_plane() for _ in range(3)))
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_planes_are_reused_without_page_faults():
    # without the setting every 64 MiB plane is a fresh mmap: at least one fault per 2 MiB
    # huge page (32), 16384 with 4 KiB pages; with it the second plane reuses the first's pages
    assert _faults("release") >= 32
    assert _faults("keep") < 8
