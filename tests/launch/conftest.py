"""Shared by the launcher tests: a small tokenized corpus (once per session) and run configs of the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "megatron_based" / "tasks" / "demo_data" / "kjv.txt"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict:
    """~17k tokens of the demo corpus with its own 1024-piece tokenizer (the tiny config's vocabulary)."""
    from megatron_based.training.data import preprocess

    root = tmp_path_factory.mktemp("data")
    text = root / "kjv.txt"
    text.write_bytes(CORPUS.read_bytes()[:60_000])
    info = preprocess([str(text)], str(root / "kjv"), vocab_size=1024, show_progress=False)
    return {"data": {"path": [info["prefix"]], "tokenizer_model": info["tokenizer_model"], "split": "95,5,0"}}


def write_config(path: Path, dataset: dict, **sections) -> Path:
    """configs/tiny.yaml at sequence 64 and a few quiet steps, updated by ``sections`` ({"train": {...}, ...})."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["model"]["seq_length"] = 64
    cfg["train"].update(micro_batch_size=2, global_batch_size=4, train_steps=6, lr_warmup_steps=2, save_interval=0,
                        log_interval=1,
                        eval_interval=0, progress=False, tensorboard_dir=None, save=str(path.parent / "ckpt"))
    cfg.update(dataset)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


SLURM_CONF = """\
ClusterName=based-test
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=30
NodeName={host} CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node slurm cluster (slurmctld + slurmd + munge on this host, config in a temp folder, reached
    through SLURM_CONF). Skips, saying why, when slurm cannot be installed or started; stops its daemons after."""
    import os
    import shutil
    import socket
    import subprocess
    import time

    if shutil.which("slurmctld") is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge",
                       shell=True, capture_output=True)
    for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: apt-get install slurm-wlm munge (make test does, as root)")
    if os.geteuid() != 0:
        pytest.skip("the test slurm cluster runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], root=root))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munged = None
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        Path("/run/munge").mkdir(exist_ok=True)  # systemd's tmpfiles would create it; containers have none
        out = subprocess.run(["munged", "--force"], capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"munged did not start ({out.stderr.strip()[-300:]})")
        munged = Path("/run/munge/munged.pid")
    try:
        for daemon in (["slurmctld", "-c", "-f", str(conf)], ["slurmd", "-f", str(conf)]):
            out = subprocess.run(daemon, env=env, capture_output=True, text=True)
            if out.returncode:
                pytest.skip(f"{daemon[0]} did not start ({out.stderr.strip()[-300:]})")
        deadline = time.time() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                           text=True).stdout:
            if time.time() > deadline:
                logs = "".join((root / f).read_text()[-500:] for f in ("slurmctld.log", "slurmd.log")
                               if (root / f).exists())
                pytest.skip(f"the slurm node never became idle: {logs}")
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in [root / "slurmd.pid", root / "slurmctld.pid", *([munged] if munged else [])]:  # munged only if this fixture started it
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
