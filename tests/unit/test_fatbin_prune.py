"""tools/fatbin_prune.py on a synthetic ELF64 library whose `.nv_fatbin` section holds two
containers (sm_80, sm_90 and sm_90 + sm_120 entries) with padding between them, laid out as CUDA's
fatbinary format: the kept architecture's payload and every header are byte-identical, the others'
payloads are zeros, nothing outside the section changes; the rebuilt wheel's RECORD matches."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import struct
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("fatbin_prune", os.path.join(ROOT, "tools", "fatbin_prune.py"))
fp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fp)


def _entry(arch: int, payload: bytes) -> bytes:
    # kind (2: ELF), version, header size 64, payload size, ..., arch at byte 28, the rest zero
    head = struct.pack("<HHIQIIHHI", 2, 0x101, 64, len(payload), 0, 0, 0, 0, arch)
    return head + bytes(64 - len(head)) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", fp.FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf(fatbin: bytes, text: bytes) -> tuple[bytes, int]:
    """ELF64 LE: header, .text, .nv_fatbin, .shstrtab, then 4 section headers."""
    names = b"\0.text\0.nv_fatbin\0.shstrtab\0"
    body_off = 64
    text_off, fat_off = body_off, body_off + len(text)
    str_off = fat_off + len(fatbin)
    shoff = str_off + len(names)
    shoff += -shoff % 8
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HHH", head, 0x3A, 64, 4, 3)

    def sh(name, off, size):
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, off, size, 0, 0, 1, 0)

    blob = bytes(head) + text + fatbin + names
    blob += bytes(shoff - len(blob))
    blob += bytes(64) + sh(1, text_off, len(text)) + sh(7, fat_off, len(fatbin)) + sh(18, str_off, len(names))
    return blob, fat_off


def _library():
    rng = __import__("random").Random(0)
    pay = {a: bytes(rng.randrange(1, 256) for _ in range(n)) for a, n in ((80, 40), (90, 56), (120, 24))}
    pay90b = bytes(rng.randrange(1, 256) for _ in range(16))
    first = _container(_entry(80, pay[80]), _entry(90, pay[90]))
    second = _container(_entry(90, pay90b), _entry(120, pay[120]))
    fatbin = first + bytes(8) + second
    text = b"host code " * 7
    lib, fat_off = _elf(fatbin, text)
    return lib, fat_off, fatbin, text, pay, pay90b


def test_prune_zeroes_other_architectures_only():
    lib, fat_off, fatbin, text, pay, pay90b = _library()
    new, seen = fp.prune(lib, 90)
    assert seen == {80: 1, 90: 2, 120: 1}
    assert len(new) == len(lib)
    assert new[:fat_off] == lib[:fat_off] and new[fat_off + len(fatbin):] == lib[fat_off + len(fatbin):]
    kept = new[fat_off: fat_off + len(fatbin)]
    assert pay[90] in kept and pay90b in kept
    assert pay[80] not in kept and pay[120] not in kept
    # exactly the two other payloads' bytes changed, every header stayed
    changed = sum(a != b for a, b in zip(kept, fatbin))
    assert 0 < changed <= len(pay[80]) + len(pay[120])
    assert fp.prune(new, 90)[0] == new  # idempotent


def test_prune_refuses_a_missing_architecture_and_a_non_elf():
    lib = _library()[0]
    with pytest.raises(ValueError, match=r"no sm_100 code .*\[80, 90, 120\]"):
        fp.prune(lib, 100)
    with pytest.raises(ValueError, match="not a 64-bit"):
        fp.prune(b"MZ" + bytes(100), 90)


def test_prune_wheel_rewrites_record(tmp_path):
    lib = _library()[0]
    src, dst = tmp_path / "x-1.0-py3-none-any.whl", tmp_path / "out.whl"
    plain = b"print('hi')\n"

    def line(name, data):
        d = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={d},{len(data)}"

    record = "\n".join([line("x/lib.so", lib), line("x/__init__.py", plain), "x-1.0.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("x/lib.so", lib)
        z.writestr("x/__init__.py", plain)
        z.writestr("x-1.0.dist-info/RECORD", record)
    report = fp.prune_wheel(str(src), str(dst), 90)
    assert report == {"x/lib.so": {80: 1, 90: 2, 120: 1}}
    with zipfile.ZipFile(dst) as z:
        new_lib = z.read("x/lib.so")
        assert new_lib == fp.prune(lib, 90)[0]
        assert z.read("x/__init__.py") == plain
        rec = z.read("x-1.0.dist-info/RECORD").decode().splitlines()
    assert rec == [line("x/lib.so", new_lib), line("x/__init__.py", plain), "x-1.0.dist-info/RECORD,,"]
