"""Triton's compiled kernels from one GPU-machine call to the next (benchmarks/run_gpu_suite.sh packs, gpu_env.sh
unpacks). The machine returns files of at most 16 MB, so an archive over that is returned in parts.

    python3 benchmarks/triton_cache.py pack CACHE_DIR OUT     # OUT (an .tar.xz) or OUT.0, OUT.1, ... if it is larger
    python3 benchmarks/triton_cache.py unpack ARCHIVE DEST    # ARCHIVE, or its parts ARCHIVE.0, ARCHIVE.1, ...

Packed per kernel: the metadata and group files (.json) and the binary (.cubin), all that a cache hit reads (Triton
loads the files of a kernel's group that exist), and the .ptx where the archive stays small with it (``pack``); not the
other IRs (.llir, .ttir, .ttgir, .source: most of the bytes) nor the autotuning results (the runs that tune still
tune). Standard library only (the GPU machine's python3 before any install; no xz binary there).
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

LIMIT = 16_000_000  # bytes per file the GPU machine returns


def _write(cache: Path, out: Path, suffixes: tuple[str, ...]) -> None:
    with tarfile.open(out, "w:xz", preset=3) as tar:  # ~9x smaller than the files at ~10 MB/s
        for d, _, files in sorted(os.walk(cache)):
            for f in sorted(files):
                if f.endswith(suffixes) and not f.endswith(".autotune.json"):
                    path = Path(d) / f
                    tar.add(path, str(path.relative_to(cache)))


def parts(archive: Path) -> list[Path]:
    """``archive``'s parts ``archive.0``, ``archive.1``, ... in order (none if ``archive.0`` does not exist)."""
    found = []
    while (p := archive.with_name(f"{archive.name}.{len(found)}")).exists():
        found.append(p)
    return found


def pack(cache: Path, out: Path, limit: int = LIMIT) -> list[Path]:
    """Archive ``cache`` into ``out``, split into ``out.0``, ``out.1``, ... of at most ``limit`` bytes where it
    does not fit one file. With the PTX where the archive without it takes at most half of ``limit`` and with it
    fits: a cache that needs parts is compressed once, not first with its PTX (xz at ~10 MB/s: on the GPU machine
    the pack runs inside the call's time). Returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in [out, *parts(out)]:
        old.unlink(missing_ok=True)
    _write(cache, out, (".cubin", ".json"))
    if out.stat().st_size <= limit // 2:
        with_ptx = out.with_name(out.name + ".ptx")
        _write(cache, with_ptx, (".cubin", ".json", ".ptx"))
        if with_ptx.stat().st_size <= limit:
            with_ptx.replace(out)
        else:
            with_ptx.unlink()
    if out.stat().st_size <= limit:
        return [out]
    data = out.read_bytes()
    out.unlink()
    written = []
    for i in range(0, len(data), limit):
        written.append(out.with_name(f"{out.name}.{i // limit}"))
        written[-1].write_bytes(data[i:i + limit])
    return written


def unpack(archive: Path, dest: Path) -> bool:
    """Extract ``archive`` (or its parts, joined in order) into ``dest``; False when there is neither."""
    pieces = [archive] if archive.exists() else parts(archive)
    if not pieces:
        return False
    dest.mkdir(parents=True, exist_ok=True)
    joined = archive if pieces == [archive] else dest / ".joined.tar.xz"
    if joined != archive:
        with joined.open("wb") as fh:
            for p in pieces:
                fh.write(p.read_bytes())
    try:
        with tarfile.open(joined) as tar:
            tar.extractall(dest, filter="data")
    finally:
        if joined != archive:
            joined.unlink()
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("cache", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--limit", type=int, default=LIMIT, help="bytes per file (default: the machine's 16 MB)")
    b = sub.add_parser("unpack")
    b.add_argument("archive", type=Path)
    b.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        if not args.cache.is_dir():
            p.error(f"pack: no Triton cache at {args.cache}")
        files = pack(args.cache, args.out, args.limit)
        print(f"{args.out.name}: {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"
              + (f" in {len(files)} parts" if len(files) > 1 else ""))
        return 0
    if not unpack(args.archive, args.dest):
        print(f"no {args.archive} (nor its parts): nothing unpacked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
