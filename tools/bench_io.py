#!/usr/bin/env python3
"""Disk reads into a tensor: the executor's direct pool against aiofiles.

The executor must move disk-tier data (weights, KV cache, activations) into
preallocated tensors.  Two ways, measured side by side on the same file, with its pages
dropped from the page cache before every read (so "disk" is disk):

- ``direct``: :class:`flexgraph.exec.diskio.DiskIO` — ``os.preadv`` straight into the
  tensor's memory, 8 MiB chunks in flight on 4 threads;
- ``aiofiles``: ``await f.read()`` in chunks of the same size on aiofiles' thread pool,
  then copying each returned ``bytes`` into the tensor (what async file APIs give you);
- ``aiofiles-whole``: one ``await f.read()`` of the whole region, then one copy.

    python tools/bench_io.py [--size 512MiB] [--dir ~/.cache/flexgraph/offload] [--repeat 3]

Prints JSON and a table: GB/s per method (best of ``--repeat``) and the ratio to direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexgraph.exec.diskio import CHUNK, DiskIO
from flexgraph.sizes import format_size, parse_size


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_direct(path: Path, out: torch.Tensor) -> None:
    io = DiskIO()
    try:
        io.read_into(path, 0, out)
    finally:
        io.close()


def read_aiofiles(path: Path, out: torch.Tensor, whole: bool) -> None:
    import aiofiles

    flat = out.view(-1).view(torch.uint8)
    n = flat.numel()

    async def chunked():
        async with aiofiles.open(path, "rb") as f:
            if whole:
                data = await f.read(n)
                flat.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                return

            async def piece(start: int, size: int):
                async with aiofiles.open(path, "rb") as g:
                    await g.seek(start)
                    data = await g.read(size)
                flat[start:start + size].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

            await asyncio.gather(*(piece(a, min(CHUNK, n - a)) for a in range(0, n, CHUNK)))

    asyncio.run(chunked())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/flexgraph/offload"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="bench-io-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            chunk = os.urandom(CHUNK)
            for _ in range(0, size, CHUNK):
                f.write(chunk)
        size = path.stat().st_size
        out = torch.empty(size, dtype=torch.uint8)
        methods = {"direct": lambda: read_direct(path, out),
                   "aiofiles": lambda: read_aiofiles(path, out, whole=False),
                   "aiofiles-whole": lambda: read_aiofiles(path, out, whole=True)}
        best = {m: 0.0 for m in methods}
        for _ in range(args.repeat):
            for m, fn in methods.items():        # interleaved, so drift hits all alike
                drop_cache(path)
                t0 = time.perf_counter()
                fn()
                best[m] = max(best[m], size / (time.perf_counter() - t0))
        report = {"bytes": size, "folder": str(folder), "GB/s": {m: v / 1e9 for m, v in best.items()},
                  "ratio_to_direct": {m: v / best["direct"] for m, v in best.items()}}
        print(json.dumps(report, indent=1))
        print(f"\nreading {format_size(size)} cold from {folder}\n")
        print("| method | GB/s | vs direct |\n|---|---:|---:|")
        for m, v in best.items():
            print(f"| {m} | {v / 1e9:.2f} | {v / best['direct']:.2f}x |")
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
