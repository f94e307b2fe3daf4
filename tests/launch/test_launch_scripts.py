"""What the launch scripts choose before they start anything: the interpreter, and mpirun's root flag."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO, write_config


def _launch(script: str, *args: str, cwd, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "NPROC_PER_NODE", "NNODES")}
    return subprocess.run([str(REPO / "launch" / script), *args], env={**base, "PYTHONWARNINGS": "ignore", **env},
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_launchers_use_python_then_the_repository_venv_and_say_which(tmp_path):
    # No config: the usage error, after the interpreter is chosen and printed.
    chosen = _launch("torchrun.sh", cwd=tmp_path, PYTHON=sys.executable)
    assert chosen.returncode == 2 and f"launch: python {sys.executable}\n" in chosen.stderr
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in the repository (make venv builds it)")
    venv = _launch("torchrun.sh", cwd=tmp_path, PATH="/usr/bin:/bin")  # no activated venv on PATH
    assert f"launch: python {REPO}/.venv/bin/python\n" in venv.stderr, venv.stderr


def test_mpirun_adds_allow_run_as_root_for_open_mpi_as_root(dataset, tmp_path):
    config = write_config(tmp_path / "run.yaml", dataset, train={"train_steps": 4})
    fake = tmp_path / "mpirun"  # Open MPI's version line, then the command line it would run
    fake.write_text('#!/bin/bash\nif [[ $1 == --version ]]; then echo "mpirun (Open MPI) 4.1.4"; exit; fi\n'
                    'echo "ARGS: $*"\n')
    fake.chmod(0o755)
    out = _launch("mpirun.sh", str(config), cwd=tmp_path, PYTHON=sys.executable, MPIRUN=str(fake),
                  NPROC_PER_NODE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    args = out.stdout.split("ARGS: ")[1].split()
    as_root = os.getuid() == 0
    assert ("--allow-run-as-root" in args) == as_root
    assert ("adding --allow-run-as-root" in out.stderr) == as_root
    assert args[:2] == ["-np", "1"]
