"""A Python script run under compute-sanitizer's memcheck in a subprocess (GPU tests): an out-of-bounds access of a
kernel does not always fault without it, and when it does it loses the CUDA context of the process that runs it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def assert_memcheck_clean(script: str, timeout: int = 300) -> None:
    """Runs ``script`` (which prints "memcheck script done" at its end) in a fresh Python on this process's path
    under memcheck; fails with memcheck's report unless it finishes with no error. Skips without compute-sanitizer."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not on PATH")
    out = subprocess.run([tool, "--tool", "memcheck", "--print-limit", "5", "--error-exitcode", "99", sys.executable,
                          "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    report = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("=========")]
    assert out.returncode == 0 and "memcheck script done" in out.stdout, \
        "\n".join(report[:30] or [out.stderr[-3000:]])
