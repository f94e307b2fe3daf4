"""Rank discovery from each launcher's environment (the MPI path runs for real in test_launchers.py)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_based.runtime import launch_env
from megatron_based.runtime.launch_env import (DEFAULT_PORT, DistEnv, LaunchError, detect_launcher, discover,
                                                first_host, free_port)


@pytest.mark.parametrize("nodelist, host", [("node07", "node07"), ("gpu[007-009,012],cpu1", "gpu007"),
                                            ("a-1,b-2", "a-1"), ("dgx[3,5]", "dgx3")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_detection_order():
    assert detect_launcher({}) == "single"
    assert detect_launcher({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}) == "torchrun"
    # mpirun inside an allocation: SLURM_PROCID is the batch step's, MPI's rank wins
    assert detect_launcher({"OMPI_COMM_WORLD_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}) == "mpi"
    assert detect_launcher({"PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_STEP_ID": "3"}) == "slurm"
    assert detect_launcher({"PMIX_RANK": "1"}) == "mpi"
    assert detect_launcher({"SLURM_PROCID": "0"}) == "single"  # the batch script itself, not an srun task
    assert detect_launcher({"MEGATRON_BASED_LAUNCHER": "mpi", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}) == "mpi"
    with pytest.raises(LaunchError, match="MEGATRON_BASED_LAUNCHER='pbs'"):
        detect_launcher({"MEGATRON_BASED_LAUNCHER": "pbs"})


def test_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123456"}
    assert discover(env) == DistEnv("slurm", 5, 8, 1, 4, "gpu03", 20000 + 123456 % 20000)
    assert discover({**env, "MASTER_ADDR": "10.0.0.3", "MASTER_PORT": "6000"}).master_addr == "10.0.0.3"
    exported = {}
    discover(env).export(exported)
    assert exported == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "gpu03", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_missing_mpi4py_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpi(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi)
    with pytest.raises(LaunchError, match=r"pip install 'megatron-based\[mpi\]'.*openmpi-bin"):
        discover({"OMPI_COMM_WORLD_RANK": "0"})


def test_a_single_process_takes_a_free_port():
    """Without MASTER_PORT a job of one process (no launcher, or WORLD_SIZE=1) gets a free port, so that tools and
    tests on one host do not all take 29500; ranks of a larger job keep the one they must agree on."""
    single = discover({})
    assert single.world_size == 1 and single.master_port != DEFAULT_PORT
    with socket.socket() as s:  # free: it can be bound
        s.bind(("", single.master_port))
    assert discover({"RANK": "0", "WORLD_SIZE": "1"}).master_port != DEFAULT_PORT
    assert discover({"RANK": "0", "WORLD_SIZE": "2"}).master_port == DEFAULT_PORT
    assert discover({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "6001"}).master_port == 6001


def test_free_ports_are_below_the_ephemeral_range(monkeypatch):
    """A rendezvous port is never one the OS could hand to another socket (bind(0), an outgoing connection) before
    the store binds it; a taken port is not returned."""
    low = launch_env._ephemeral_range()[0]
    ports = {free_port() for _ in range(50)}
    assert all(20000 <= p < low for p in ports) and len(ports) > 40  # random, not one port for everyone
    with socket.socket() as busy:
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        # the only candidate below the (pretended) ephemeral range is taken: an OS-chosen port instead
        monkeypatch.setattr(launch_env, "_ephemeral_range", lambda: (taken + 1, taken + 2))
        port = free_port(low=taken)
        assert port != taken
        with socket.socket() as s:
            s.bind(("", port))


def test_initialize_parallel_single_process_binds_no_port():
    """``initialize_parallel`` in one process rendezvouses in-process: it starts with no launcher variables while
    29500 is taken, and with WORLD_SIZE=1 and a MASTER_PORT that another process holds (a TCP store would fail
    there with EADDRINUSE: the race two tools on one host ran into)."""
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    code = ("import torch.distributed as dist; from megatron_based.runtime.parallel import initialize_parallel; "
            "initialize_parallel(backend='gloo'); dist.all_reduce(__import__('torch').ones(1)); "
            "print(dist.get_world_size())")
    with socket.socket() as busy:
        try:
            busy.bind(("", DEFAULT_PORT))
        except OSError:  # already taken by another process: the same situation
            busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for env in (base, {**base, "RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(port)}):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                                 cwd=Path(__file__).resolve().parents[2])
            assert out.returncode == 0, out.stderr[-2000:]
            assert out.stdout.split()[-1] == "1"
