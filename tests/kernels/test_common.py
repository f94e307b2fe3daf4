"""``based_kernels._common``: ``check_cu_seqlens`` (the one check of document offsets that every varlen path runs)
and the autotuning switch."""
import os
import subprocess
import sys

import pytest
import torch

from based_kernels._common import check_cu_seqlens


def test_check_cu_seqlens_syncs_once_per_tensor_version(monkeypatch):
    syncs = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (syncs.append(1), tolist(self))[1])
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    assert check_cu_seqlens(cu, 10) == check_cu_seqlens(cu, 10) == [0, 3, 10]
    assert len(syncs) == 1  # the second call (another layer, the backward) is a cache hit
    cu[1] = 11  # changed in place: checked again
    with pytest.raises(ValueError, match=r"must rise from 0 to T=10 .* cu_seqlens\[2\] = 10 < cu_seqlens\[1\] = 11"):
        check_cu_seqlens(cu, 10)
    cu[1] = 3
    with pytest.raises(ValueError, match=r"T=12 .* cu_seqlens\[-1\] = 10"):  # the same tensor for another T
        check_cu_seqlens(cu, 12)
    with pytest.raises(ValueError, match=r"cu_seqlens needs batch size 1 .* got B=2"):
        check_cu_seqlens(cu, 10, B=2)
    with pytest.raises(ValueError, match=r"1-D integer tensor \[N \+ 1\] .* torch.int32 \(1, 3\)"):
        check_cu_seqlens(cu[None], 10)
    with torch.inference_mode():  # no version counter: checked on every call, still correct
        frozen = torch.tensor([0, 10])
    assert check_cu_seqlens(frozen, 10) == [0, 10]
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 10"):
        check_cu_seqlens(frozen, 11)


@pytest.mark.parametrize("setting, tuned", [(None, True), ("0", False)])
def test_autotune_switch_keeps_every_config(setting, tuned):
    """BASED_KERNELS_AUTOTUNE=0: the autotuner gets the first config of the GPU list only; ``.all`` keeps the list
    (test_every_config.py runs each; the GPU kernel tests one each). Compiled-kernel mode (no interpreter), in a
    fresh process: read at import. (Unset reads as "1": an explicit "1" takes the same path.)"""
    code = ("from based_kernels.sliding_window.forward import swa_fwd_kernel as k; "
            "print(len(k.configs), len(k.configs.all), k.configs[0] is k.configs.all[0])")
    env = {key: v for key, v in os.environ.items() if key != "BASED_KERNELS_AUTOTUNE"}
    env["TRITON_INTERPRET"] = "0"
    if setting is not None:
        env["BASED_KERNELS_AUTOTUNE"] = setting
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, n_all, first = out.stdout.split()
    assert int(n_all) > 1 and first == "True", out.stdout
    assert int(n) == (int(n_all) if tuned else 1), out.stdout


@pytest.mark.parametrize("user_value", [None, "/tmp/my-triton-cache"])
def test_triton_cache_dir_is_pinned_at_import(tmp_path, user_value):
    """Importing based_kernels sets TRITON_CACHE_DIR (unless the user did) to Triton's default directory, so that
    PyTorch Inductor, which sets it to its own directory when it finds it unset, cannot move our kernels' compile
    and autotuning caches in the middle of a process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TRITON_HOME")}
    env["HOME"] = str(tmp_path)
    if user_value:
        env["TRITON_CACHE_DIR"] = user_value
    code = ("import os, based_kernels; from torch._inductor.runtime.cache_dir_utils import triton_cache_dir; "
            "print(os.environ['TRITON_CACHE_DIR']); print(triton_cache_dir(0))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    want = user_value or str(tmp_path / ".triton" / "cache")
    assert out.stdout.split() == [want, want]


@pytest.mark.parametrize("user_value, cached", [(None, True), ("0", False)])
def test_autotuning_results_are_cached_by_default(user_value, cached):
    """Importing based_kernels turns on Triton's on-disk autotuning cache (unless the user set
    TRITON_CACHE_AUTOTUNING): a resumed run reads the configs the interrupted one chose."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_AUTOTUNING", "TRITON_INTERPRET")}
    if user_value is not None:
        env["TRITON_CACHE_AUTOTUNING"] = user_value
    code = ("from based_kernels.rms_norm.kernels import rms_fwd_kernel; "
            "from based_kernels.sliding_window.forward import swa_fwd_kernel; "
            "print(rms_fwd_kernel.cache_results, swa_fwd_kernel.cache_results)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(cached)] * 2


@pytest.mark.parametrize("value, local, expect", [("", "1", "default"), ("", "64", "1"), ("1", "1", "1"),
                                                  ("6", "64", "6"), ("two", "1", "error")])
def test_compile_threads_setting(value, local, expect):
    """BASED_KERNELS_COMPILE_THREADS: unset or empty means min(8, this process's share of the CPUs among torchrun's
    LOCAL_WORLD_SIZE processes), at least 1; a bad value is a one-line error naming it."""
    env = {**os.environ, "BASED_KERNELS_COMPILE_THREADS": value, "LOCAL_WORLD_SIZE": local}
    code = "import os, based_kernels._common as c; print(c.COMPILE_THREADS, max(1, min(8, os.cpu_count() or 1)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if expect == "error":
        assert out.returncode != 0 and "BASED_KERNELS_COMPILE_THREADS='two': set it to a whole number" in out.stderr
        return
    got, default = out.stdout.split()
    assert got == (default if expect == "default" else expect)
