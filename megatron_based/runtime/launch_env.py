"""Who am I in the job? Rank, world size, local rank and the rendezvous address from whichever launcher started us.

Launchers, in the order they are recognised:

* **torchrun** (also ``srun ... torchrun`` and DeepSpeed's launcher): ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``MASTER_ADDR``/``MASTER_PORT`` are already set; nothing to do.
* **MPI** (``mpirun``/``mpiexec``, Open MPI, MPICH or MVAPICH): rank, size and local rank come from mpi4py's
  ``COMM_WORLD`` (local rank from the shared-memory sub-communicator), and rank 0's host name and a free port are
  broadcast with mpi4py, so no address has to be known in advance.
* **slurm** (one task per GPU, ``srun`` without torchrun): ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``;
  the address is the first host of the step's node list and the port is derived from the job id, so two jobs
  sharing a node do not collide.

The result is written into the environment variables above, so ``torch.distributed`` initialises with ``env://``
(``megatron_based.runtime.parallel.initialize_parallel`` does exactly that).
``MEGATRON_BASED_LAUNCHER=torchrun|mpi|slurm|single`` overrides the detection (e.g. ``mpi`` to use the mpi4py
bootstrap under ``srun --mpi=pmix``).
``MASTER_ADDR``/``MASTER_PORT`` set by the user win over the derived ones (MPI and slurm alike).
"""
from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from typing import Mapping

LAUNCHERS = ("torchrun", "mpi", "slurm", "single")
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def export(self, environ: dict | None = None) -> None:
        """Write the variables torch.distributed's ``env://`` and Megatron read."""
        environ = os.environ if environ is None else environ
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                       MASTER_PORT=str(self.master_port))


class LaunchError(RuntimeError):
    """The launch environment is unusable; the message says what to install or set."""


def detect_launcher(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    forced = environ.get("MEGATRON_BASED_LAUNCHER")
    if forced:
        if forced not in LAUNCHERS:
            raise LaunchError(f"MEGATRON_BASED_LAUNCHER={forced!r}; use one of {list(LAUNCHERS)}")
        return forced
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    # mpirun inside a slurm allocation inherits the batch step's SLURM_PROCID (0 everywhere), so MPI wins over slurm,
    # except PMIx alone: that is also what `srun --mpi=pmix` sets, and slurm's own variables are right there.
    if any(v in environ for v in MPI_RANK_VARS[:3]):
        return "mpi"
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return "slurm"
    if "PMIX_RANK" in environ:
        return "mpi"
    return "single"


def first_host(nodelist: str) -> str:
    """The first host of a slurm hostlist: ``gpu[007-009,012],cpu1`` -> ``gpu007`` (zero padding kept)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"cannot parse the slurm node list {nodelist!r}; set MASTER_ADDR to the first node's name")
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        if environ.get(name, "").strip():
            m = re.match(r"\d+", environ[name].strip())  # SLURM_TASKS_PER_NODE looks like "2(x3),1"
            if m:
                return int(m.group())
    if default is None:
        raise LaunchError(f"none of {list(names)} is set; was this started by the launcher it claims?")
    return default


def _slurm_env(environ: Mapping[str, str]) -> DistEnv:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or socket.gethostname()
    job_id = _int(environ, "SLURM_JOB_ID", default=0)
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    return DistEnv(
        launcher="slurm", rank=_int(environ, "SLURM_PROCID"), world_size=world,
        local_rank=_int(environ, "SLURM_LOCALID", default=0),
        local_world_size=_int(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
                              default=world),
        master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
        master_port=_int(environ, "MASTER_PORT", default=20000 + job_id % 20000),
    )


def _ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out for bind(0) and outgoing connections (Linux: 32768-60999 unless changed)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(low: int = 20000) -> int:
    """A TCP port that is free now, for a rendezvous that another process (rank) must find.

    Chosen at random below the OS's ephemeral range, so that no socket the OS numbers itself (another tool's bind(0),
    any outgoing connection, e.g. a gloo group's) can take it between this check and the store's bind; a port taken
    from the OS (bind(0)) could. Falls back to an OS-chosen port when the range below the ephemeral one is all taken
    (or there is none)."""
    high = _ephemeral_range()[0]
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # not the seeded global RNG: forked twins differ
    for _ in range(64 if high > low else 0):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_env(environ: Mapping[str, str]) -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError as err:  # not installed, or installed against an MPI library that is missing now
        raise LaunchError(
            f"this process was started by an MPI launcher but mpi4py cannot be imported ({err}). Install it with "
            "`pip install 'megatron-based[mpi]'` (it needs an MPI runtime, e.g. `apt-get install openmpi-bin "
            "libopenmpi-dev`), or launch with launch/torchrun.sh instead"
        ) from err
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    address = None
    if comm.Get_rank() == 0:
        address = (environ.get("MASTER_ADDR") or socket.gethostname(),
                   _int(environ, "MASTER_PORT", default=0) or free_port())
    address = comm.bcast(address, root=0)
    env = DistEnv(launcher="mpi", rank=comm.Get_rank(), world_size=comm.Get_size(), local_rank=local.Get_rank(),
                  local_world_size=local.Get_size(), master_addr=address[0], master_port=address[1])
    local.Free()
    return env


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place in the job, from the launcher that started it (see the module docstring)."""
    environ = os.environ if environ is None else environ
    launcher = detect_launcher(environ)
    if launcher == "mpi":
        return _mpi_env(environ)
    if launcher == "slurm":
        return _slurm_env(environ)
    world = _int(environ, "WORLD_SIZE", default=1)
    return DistEnv(
        launcher=launcher, rank=_int(environ, "RANK", default=0), world_size=world,
        local_rank=_int(environ, "LOCAL_RANK", default=0),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", default=world),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", default=0) or default_port(world),
    )


def default_port(world_size: int) -> int:
    """MASTER_PORT when none is set: ranks of a job must agree on one (29500, torchrun's). A single process needs
    no rendezvous (``initialize_parallel`` gives it an in-process store) and gets a free port, for third-party code
    that reads MASTER_PORT, so that single-process tools on one host never all claim 29500."""
    return DEFAULT_PORT if world_size > 1 else free_port()


def setup_distributed_env() -> DistEnv:
    """Discover the job layout and export it for ``torch.distributed.init_process_group(init_method='env://')``.

    Call once per process before any process group exists (``megatron_based.training.loop`` does, first thing).
    """
    env = discover()
    env.export()
    return env
