"""Hugging Face checkpoint directories: safetensors (single or sharded with the index), the
config, tokenizer/generation files, and writing a directory so nothing half-written is ever left.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterable, Iterator, Optional

import torch

from r1mega.convert import fp8_blocks
from r1mega.convert.families import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files carried verbatim between HF dir -> our checkpoint (hf_assets/) -> HF dir.
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConversionError(f"dtype '{name}' is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


class HFCheckpoint:
    """Lazy reader of a HF model directory; every problem names the file or tensor."""

    def __init__(self, hf_dir: str, key: str = "--hf"):
        """``key`` names where ``hf_dir`` came from (a flag or a config key) in errors."""
        from safetensors import safe_open

        self.dir = hf_dir
        cfg_path = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConversionError(f"{key}={hf_dir}: {cfg_path} does not exist; {key} must be a "
                                  f"Hugging Face model directory (config.json + safetensors).")
        with open(cfg_path) as f:
            self.config = json.load(f)
        index_path = os.path.join(hf_dir, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                self.weight_map = dict(json.load(f)["weight_map"])
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_NAME)):
            self.weight_map = None
        else:
            bins = [n for n in os.listdir(hf_dir) if n.endswith(".bin")]
            hint = " It holds pickled .bin weights: re-save them as safetensors first." if bins else ""
            raise ConversionError(f"{hf_dir} has neither {SINGLE_NAME} nor {INDEX_NAME}.{hint}")
        shards = sorted(set(self.weight_map.values())) if self.weight_map else [SINGLE_NAME]
        for shard in shards:
            if not os.path.isfile(os.path.join(hf_dir, shard)):
                tensors = [n for n, s in (self.weight_map or {}).items() if s == shard]
                raise ConversionError(
                    f"shard '{shard}' listed in {INDEX_NAME} is missing from {hf_dir} "
                    f"(it holds {len(tensors)} tensors, e.g. '{tensors[0] if tensors else '?'}')."
                )
        self._handles = {s: safe_open(os.path.join(hf_dir, s), framework="pt") for s in shards}
        if self.weight_map is None:
            self.weight_map = {n: SINGLE_NAME for n in self._handles[SINGLE_NAME].keys()}
        else:
            for shard, h in self._handles.items():
                listed = {n for n, s in self.weight_map.items() if s == shard}
                absent = listed - set(h.keys())
                if absent:
                    raise ConversionError(f"{INDEX_NAME} places '{sorted(absent)[0]}' in '{shard}', "
                                          f"but that shard does not contain it: the index is stale.")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"tensor '{name}' is not in the HF checkpoint {self.dir}.")
        t = self._handles[self.weight_map[name]].get_tensor(name)
        if t.dtype in fp8_blocks.FP8_DTYPES:
            # Released DeepSeek-V3 weights: FP8 with 128x128 block scales, dequantised here.
            scales = fp8_blocks.scale_name(name)
            if scales not in self.weight_map:
                raise ConversionError(f"HF tensor '{name}' is {t.dtype} without '{scales}' in {self.dir}; "
                                      f"only block-scaled FP8 (DeepSeek-V3's format) converts.")
            try:
                t = fp8_blocks.dequantize_blockwise(t, self.get(scales), name=name)
            except ValueError as exc:
                raise ConversionError(f"{self.dir}: {exc}") from None
        return t

    def dtype(self) -> torch.dtype:
        """The one floating dtype of the weights (a mixed checkpoint is refused by name).

        Not counted: tensors transformers keeps in float32 whatever the model dtype (the MoE router
        and its selection bias) and FP8 block scales; FP8 weights count as bfloat16, the dtype
        DeepSeek-V3 keeps its unquantised tensors in."""
        seen = {}
        for shard, h in self._handles.items():
            for name in h.keys():
                st = h.get_slice(name).get_dtype()
                if name.endswith(("weight_scale_inv", "e_score_correction_bias", "mlp.gate.weight")):
                    continue
                seen.setdefault("BF16" if st.startswith("F8") else st, name)
        if len(seen) != 1:
            raise ConversionError(f"HF checkpoint {self.dir} mixes dtypes {dict(seen)} (dtype: first "
                                  f"tensor); convert it to one dtype first.")
        st = next(iter(seen))
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        if st not in names:
            raise ConversionError(f"HF tensor '{seen[st]}' has dtype {st}; only F32/BF16/F16 convert.")
        return _DTYPES[names[st]]


def check_shapes(ckpt: HFCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name in ckpt.weight_map and ckpt.shape(name) != tuple(shape):
            raise ConversionError(
                f"HF tensor '{name}' has shape {list(ckpt.shape(name))} but config.json implies "
                f"{list(shape)}; the weights and config.json disagree."
            )


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or shards + index; returns files."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.contiguous()
        sizes[-1] += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_NAME), metadata=meta)
        return [SINGLE_NAME]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX_NAME]


def carry_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer / generation / chat-template files that exist in ``src_dir``."""
    copied = []
    os.makedirs(dst_dir, exist_ok=True)
    for name in CARRIED_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def partial_path(out_dir: str) -> str:
    """Deterministic sibling temp path (the same on every rank of a multi-rank save)."""
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


def check_output_free(out_dir: str, overwrite: bool = False) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConversionError(f"output path {out_dir} exists and is not empty; choose a new path "
                              f"or remove it (nothing was written).")


def commit_dir(tmp: str, out_dir: str) -> None:
    """Atomic on one filesystem: the output path holds either nothing or the complete result."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Single-process writer: yields a temp dir, renamed onto ``out_dir`` only on success."""
    check_output_free(out_dir, overwrite)
    tmp = partial_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out_dir)


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
