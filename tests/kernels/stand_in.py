"""A stand-in Triton driver for tests that compile the kernels for sm_90 on a CPU machine (Triton's compiler and the
ptxas that ships with triton, down to a cubin) without a GPU: ``DRIVER`` is the source that scripts run in a fresh
Python without TRITON_INTERPRET (``run``) paste before their own code. It defines ``FakeDriver`` (an sm_90 target
on CPU tensors) and activates it after the script sets ``compiler.CompiledKernel._init_handles`` (what loading a
compiled kernel does: record, refuse, ...)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent("""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime.driver import driver

    class FakeDriver:
        launcher_cls = None
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")
""")


def run(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python on this test process's path, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
