"""The launch scripts, run for real on this machine: torchrun (2 processes, a worker killed and the job resumed),
mpirun through the mpi4py bootstrap, and a single-node slurm cluster (see conftest's ``slurm`` fixture)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, write_config

pytestmark = pytest.mark.launch
ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", "NPROC_PER_NODE": "2",
       "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def steps(log: str) -> dict[int, float]:
    """{step: loss} from the training log."""
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+)\s+loss ([\d.]+)", log, re.M)}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_torchrun_restarts_a_killed_worker_from_the_checkpoint(dataset, tmp_path):
    config = write_config(tmp_path / "run.yaml", dataset, train={"train_steps": 16, "save_interval": 4})
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(REPO / "launch/torchrun.sh"), str(config)], env={**ENV, "MAX_RESTARTS": "1"},
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.time() + 240
            while not (tmp_path / "ckpt" / "latest").exists():  # the first checkpoint (step 4) is complete
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            workers = _children(proc.pid)
            assert len(workers) == 2, workers
            os.kill(workers[1], signal.SIGKILL)
            assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert resumed, text[-3000:]
    assert "done: step 16" in text
    restart_step = int(resumed.group(2))
    assert restart_step in (4, 8, 12)
    assert sorted(steps(text)) == list(range(1, 17))  # every step logged, the resumed ones after the restart
    assert text.index("resumed from") < text.rindex(f"step {restart_step + 1} ")


def test_mpi_bootstrap_gives_ranks_and_one_address():
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun: apt-get install openmpi-bin libopenmpi-dev (the Makefile's test target does)")
    pytest.importorskip("mpi4py", reason="pip install -e '.[mpi]' in the checkout")
    code = ("import os; from megatron_based.runtime.launch_env import discover; e = discover(); os.write(1, ("
            "f'ENV {e.launcher} {e.rank} {e.world_size} {e.local_rank} {e.local_world_size} {e.master_addr} "
            "{e.master_port}\\n').encode())")  # one write per rank: lines stay whole
    out = subprocess.run(["mpirun", "-np", "2", sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("ENV"))
    assert [r[:5] for r in rows] == [["mpi", "0", "2", "0", "2"], ["mpi", "1", "2", "1", "2"]]
    assert rows[0][5:] == rows[1][5:] and int(rows[0][6]) > 0  # rank 0's host and port, broadcast


def test_mpirun_trains_through_the_mpi4py_bootstrap(dataset, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun: apt-get install openmpi-bin libopenmpi-dev (the Makefile's test target does)")
    pytest.importorskip("mpi4py", reason="pip install -e '.[mpi]' in the checkout")
    config = write_config(tmp_path / "run.yaml", dataset, train={"train_steps": 4})
    out = subprocess.run([str(REPO / "launch/mpirun.sh"), str(config)], env=ENV, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = steps(out.stdout)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert "done: step 4" in out.stdout


def test_slurm_job_checkpoints_on_the_time_limit_signal_and_requeues(slurm, dataset, tmp_path):
    # periodic saves before the SIGTERM, as in a real run: the save it asks for is not the run's first
    config = write_config(tmp_path / "run.yaml", dataset, train={"train_steps": 300, "save_interval": 2})
    env = {**ENV, **slurm, "GPUS_PER_NODE": "2", "GRES": "", "TIME": "10", "SBATCH_ARGS": "--cpus-per-task=1"}
    out = subprocess.run([str(REPO / "launch/submit.sh"), str(config)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    log = tmp_path / "runs" / "slurm" / f"based-{job}.out"
    run_dir = tmp_path / "runs" / "slurm" / f"based-{job}"
    try:
        deadline = time.time() + 240
        while not (log.exists() and re.search(r"^step 3 ", log.read_text(), re.M)):
            failed = log.exists() and "srun: error" in log.read_text()
            assert time.time() < deadline and not failed, log.read_text()[-3000:] if log.exists() else "no job log"
            time.sleep(0.5)
        # what slurm does 3 minutes before the time limit (--signal=B:USR1@180): USR1 to the batch script
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
        deadline = time.time() + 120
        while "requeueing job" not in log.read_text():
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        stopped = int(re.search(r"SIGTERM: stopped at step (\d+) after saving", text).group(1))
        assert 3 <= stopped < 300
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
        assert "job " + job + " (restart 0)" in text and "2 tasks" in text
        assert sorted(steps(text)) == list(range(1, stopped + 1))
        restarts = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        assert "Restarts=1" in restarts
    finally:
        subprocess.run(["scancel", job], env=env)
