"""benchmarks/triton_cache.py: the Triton cache carried between GPU-machine calls. Packs each kernel's .cubin /
.json (and .ptx while that fits one file), never the other IRs or autotuning results; an archive over the machine's
per-file limit is written in parts that unpack to the same files; a re-pack removes the parts of an earlier one;
gpu_env.sh's unpack line works on a single archive, on parts and without either."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import triton_cache  # noqa: E402


def fake_cache(root: Path, kernels: int, cubin_bytes: int) -> dict[str, bytes]:
    """Kernel directories as Triton writes them; returns {relative path: content} of every file."""
    files = {}
    for k in range(kernels):
        d = f"HASH{k:03d}"
        files[f"{d}/kernel.cubin"] = os.urandom(cubin_bytes)  # incompressible, like a binary
        files[f"{d}/kernel.json"] = b'{"name": "kernel"}'
        files[f"{d}/__grp__kernel.json"] = b'{"child_paths": {}}'
        files[f"{d}/kernel.ptx"] = os.urandom(cubin_bytes // 2)
        files[f"{d}/kernel.llir"] = b"llvm" * 100
        files[f"{d}/kernel.autotune.json"] = b"{}"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def unpacked(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


@pytest.mark.parametrize("limit, ptx, n_parts", [(10_000_000, True, 1), (60_000, False, 1), (20_000, False, 3)])
def test_pack_fits_the_limit_and_unpacks_the_same_files(tmp_path, limit, ptx, n_parts):
    """6 kernels of 8 kB binaries: ~72 kB with the PTX, ~48 kB without; at a 20 kB limit three parts."""
    files = fake_cache(tmp_path / "cache", 6, 8000)
    out = tmp_path / "out" / "triton_cache.tar.xz"
    out.parent.mkdir()
    written = triton_cache.pack(tmp_path / "cache", out, limit)
    assert len(written) == n_parts and all(f.stat().st_size <= limit for f in written)
    assert written == ([out] if n_parts == 1 else triton_cache.parts(out)) and (out.exists() == (n_parts == 1))
    assert triton_cache.unpack(out, tmp_path / "dest")
    want = {k: v for k, v in files.items() if k.endswith((".cubin", ".json", ".ptx" if ptx else ".cubin"))
            and not k.endswith(".autotune.json")}
    assert unpacked(tmp_path / "dest") == want


def test_repack_removes_an_earlier_packs_parts(tmp_path):
    fake_cache(tmp_path / "cache", 6, 8000)
    out = tmp_path / "triton_cache.tar.xz"
    assert len(triton_cache.pack(tmp_path / "cache", out, 20_000)) == 3
    assert triton_cache.pack(tmp_path / "cache", out, 10_000_000) == [out] and not triton_cache.parts(out)
    assert not triton_cache.unpack(tmp_path / "missing.tar.xz", tmp_path / "dest")


# gpu_env.sh's unpack lines, as written there (the rest of the file installs wheels: GPU machine only)
def _gpu_env_unpack_lines() -> str:
    lines = (REPO / "benchmarks/gpu_env.sh").read_text().splitlines()
    start = lines.index("mkdir -p .triton-cache")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("export TRITON_CACHE_DIR"))
    return "\n".join(lines[start:end + 1])


@pytest.mark.parametrize("form", ["single", "parts", "none"])
def test_gpu_env_unpacks_what_the_suite_returned(tmp_path, form):
    files = fake_cache(tmp_path / "cache", 3, 8000)
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "benchmarks/triton_cache.py").write_text((REPO / "benchmarks/triton_cache.py").read_text())
    if form != "none":  # as saved from the call's files: triton_cache.tar.xz[.N] -> .triton-cache.tar.xz[.N]
        for f in triton_cache.pack(tmp_path / "cache", tmp_path / "triton_cache.tar.xz",
                                   10_000_000 if form == "single" else 20_000):
            f.rename(checkout / f".{f.name.replace('triton_cache', 'triton-cache')}")
    script = _gpu_env_unpack_lines() + '\necho "TRITON_CACHE_DIR=$TRITON_CACHE_DIR"\n'
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    out = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"TRITON_CACHE_DIR={checkout}/.triton-cache" in out.stdout
    got = {k: v for k, v in unpacked(checkout / ".triton-cache").items() if k != ".unpacked"}
    kept = (".cubin", ".json", ".ptx") if form == "single" else (".cubin", ".json")  # parts: too big with the PTX
    assert got == ({} if form == "none" else {k: v for k, v in files.items() if k.endswith(kept)
                                              and not k.endswith(".autotune.json")})
    assert (checkout / ".triton-cache/.unpacked").exists()
