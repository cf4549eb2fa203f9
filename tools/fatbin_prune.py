"""Keep one GPU architecture's device code in a wheel's CUDA libraries, to carry it in fewer parts.

Transformer Engine's core wheel (276 MB) holds its kernels for eight architectures (sm_75 ... sm_120)
in each library's `.nv_fatbin` section. The device machine is an H200 (sm_90) and takes at most
64 MiB per call, so `tools/gpu_te.sh prepare` zeroes every other architecture's payload: the
offsets, sizes and entry headers stay as they were (nothing else in the library moves), and the
zeroed payloads compress to almost nothing in the rebuilt wheel. The CUDA driver picks an entry by
its header's architecture, so the zeroed ones are never read on the machine they are kept for.

    python3 tools/fatbin_prune.py IN.whl OUT.whl --arch 90

The wheel's RECORD gets the changed files' new hashes and sizes.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import sys
import zipfile

FATBIN_MAGIC = 0xBA55ED50
ELF_MAGIC = b"\x7fELF"


def _sections(data: bytes) -> dict:
    """ELF64 little-endian section name -> (file offset, size)."""
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)

    names_off = header(shstrndx)[4]
    out = {}
    for i in range(shnum):
        name, _, _, _, off, size = header(i)
        start = names_off + name
        out[data[start:data.index(b"\0", start)].decode()] = (off, size)
    return out


def prune(data: bytes, keep_arch: int) -> tuple[bytes, dict]:
    """``data`` with every `.nv_fatbin` entry whose architecture is not ``keep_arch`` zeroed (its
    header kept); returns it and {arch: entries} of what the section held."""
    secs = _sections(data)
    if ".nv_fatbin" not in secs:
        return data, {}
    off, size = secs[".nv_fatbin"]
    buf = bytearray(data)
    seen: dict = {}
    pos, end = off, off + size
    while pos + 16 <= end:
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", buf, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between containers
            pos += 8
            continue
        entry, stop = pos + hsize, pos + hsize + fsize
        while entry < stop:
            _, _, ehsize, psize = struct.unpack_from("<HHIQ", buf, entry)
            arch, = struct.unpack_from("<I", buf, entry + 28)
            seen[arch] = seen.get(arch, 0) + 1
            if arch != keep_arch:
                buf[entry + ehsize: entry + ehsize + psize] = bytes(psize)
            entry += ehsize + psize
        if entry != stop:
            raise ValueError(f"fatbin container at {pos} does not end where its header says")
        pos = stop
    if keep_arch not in seen:
        raise ValueError(f"no sm_{keep_arch} code in this library (it has {sorted(seen)})")
    return bytes(buf), seen


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def prune_wheel(src: str, dst: str, keep_arch: int) -> dict:
    """Copy wheel ``src`` to ``dst`` with every ELF library's other architectures zeroed."""
    changed, report = {}, {}
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        for info in infos:
            if info.filename.endswith(".so") or ".so." in info.filename:
                data = zin.read(info)
                if data[:4] == ELF_MAGIC:
                    new, seen = prune(data, keep_arch)
                    if seen:
                        changed[info.filename], report[info.filename] = new, seen
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        lines = [_record_line(name, changed[name]) if (name := ln.split(",")[0]) in changed else ln
                 for ln in zin.read(record).decode().splitlines()]
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in infos:
                if info.filename == record:
                    zout.writestr(info, "\n".join(lines) + "\n")
                else:
                    zout.writestr(info, changed.get(info.filename) or zin.read(info))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--arch", type=int, default=90, help="the architecture kept, e.g. 90 for sm_90")
    args = ap.parse_args(argv)
    for name, seen in prune_wheel(args.src, args.dst, args.arch).items():
        print(f"{name}: kept sm_{args.arch} of {', '.join(f'sm_{a} x{n}' for a, n in sorted(seen.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
