"""Our side of a checkpoint: megatron ``dist_checkpointing`` of the model, plus ``meta.json``.

Layout (shared with the trainer's checkpoints and ``r1mega generate``)::

    path/model/      dist_checkpointing of {"model0": chunk0.sharded_state_dict(), ...}; the
                     ShardedTensor keys inside are global, so any TP/PP/VPP layout can load it
    path/meta.json   format version, the ModelConfig as a dict, padded vocab size, who wrote it
    path/hf_assets/  (converter only) tokenizer / generation files and the original config.json

Everything is written under a sibling ``.NAME.partial`` directory and renamed at the end, so the
output path never holds half a checkpoint.

The one layout-dependent shape is the vocabulary padding (a multiple of divisible_by × TP). When
the stored padded size differs from the model's, the embedding / output layer are read whole and
re-padded for this layout instead of failing.

``load_hf_into_model`` and ``export_hf`` (HF side, any layout) live in ``hf_bridge`` and are
re-exported here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from r1mega.convert.families import ConversionError
from r1mega.convert.hf_bridge import export_hf, load_hf_into_model, unwrap_chunk  # noqa: F401
from r1mega.convert.hf_io import partial_path

FORMAT = "r1mega-mcore"
FORMAT_VERSION = 1
META_NAME = "meta.json"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _raise_everywhere(error: Optional[BaseException], what: str) -> None:
    """Rank 0's failure becomes every rank's failure (instead of a hang at the next barrier)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [repr(error) if error is not None else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise ConversionError(f"{what} failed on rank 0: {box[0]}")
    if error is not None:
        raise error


def model_sharded_state_dict(model_chunks) -> dict:
    return {f"model{i}": unwrap_chunk(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _versions() -> dict:
    import megatron.core

    out = {"torch": torch.__version__, "megatron_core": megatron.core.__version__}
    try:
        from importlib.metadata import version

        out["r1mega"] = version("r1mega")
    except Exception:
        out["r1mega"] = "source"
    return out


def _padded_vocab(sharded: dict) -> Optional[int]:
    from megatron.core.dist_checkpointing import ShardedTensor

    for sub in sharded.values():
        st = sub.get(VOCAB_KEYS[0]) if isinstance(sub, dict) else None
        if isinstance(st, ShardedTensor):
            return int(st.global_shape[0])
    return None


def save_model_state(model_chunks, path: str, model_cfg=None, *, extra_meta: Optional[dict] = None,
                     add_files: Optional[Callable[[str], None]] = None, overwrite: bool = False) -> str:
    """Collective: every rank calls it. ``add_files(tmp_dir)`` (rank 0) adds files before commit."""
    from megatron.core import dist_checkpointing

    tmp = partial_path(path)
    error = None
    if _rank() == 0:
        try:
            if os.path.exists(path) and os.listdir(path) and not overwrite:
                raise ConversionError(f"output path {path} exists and is not empty; choose a new path "
                                      f"or remove it (nothing was written).")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "model"))
        except Exception as exc:
            error = exc
    _raise_everywhere(error, f"preparing {path}")
    sharded = model_sharded_state_dict(model_chunks)
    try:
        dist_checkpointing.save(sharded, os.path.join(tmp, "model"))
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if _rank() == 0:
        try:
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "model_config": dataclasses.asdict(model_cfg) if model_cfg is not None else None,
                "padded_vocab_size": _padded_vocab(sharded),
                "num_chunks_written": len(model_chunks),
                "written_by": _versions(),
            }
            meta.update(extra_meta or {})
            if add_files is not None:
                add_files(tmp)
            with open(os.path.join(tmp, META_NAME), "w") as f:
                json.dump(meta, f, indent=1, default=str)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
    _raise_everywhere(error, f"committing {path}")
    return path


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{meta_path} does not exist: {path} is not an r1mega model checkpoint "
                              f"(expected {META_NAME} and model/).")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')} "
                              f"is not {FORMAT} v{FORMAT_VERSION}; this r1mega cannot read it.")
    return meta


def model_config_from_meta(meta: dict):
    from r1mega.config import ModelConfig

    data = meta.get("model_config")
    if not data:
        raise ConversionError("meta.json has no model_config; the checkpoint cannot rebuild its model.")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConversionError(f"meta.json model_config has keys {unknown} this r1mega's ModelConfig "
                              f"does not know; upgrade r1mega.")
    return ModelConfig(**data)


def _walk(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(d: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _get(d: dict, path: tuple) -> Any:
    for k in path:
        d = d[k]
    return d


def _repad_vocab_tensors(sharded: dict, stored: dict, vocab_size: Optional[int]) -> list:
    """Swap vocab-dim ShardedTensors whose stored padded size differs for whole-tensor reads.

    Returns (path, original ShardedTensor) pairs to finish after loading.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    fixes = []
    for path, st in list(_walk(sharded)):
        if not isinstance(st, ShardedTensor) or st.key not in stored:
            continue
        want, have = tuple(st.global_shape), tuple(stored[st.key].global_shape)
        if want == have:
            continue
        if st.key not in VOCAB_KEYS or want[1:] != have[1:] or st.prepend_axis_num or st.flattened_range:
            raise ConversionError(f"checkpoint tensor '{st.key}' has global shape {list(have)}, the model "
                                  f"expects {list(want)}: the checkpoint belongs to another model config.")
        if vocab_size is None or vocab_size > min(want[0], have[0]):
            raise ConversionError(f"'{st.key}': stored vocab padding {have[0]} != {want[0]} and "
                                  f"meta.json does not give a vocab_size that fits both.")
        whole = ShardedTensor.from_rank_offsets(
            st.key, torch.empty(have, dtype=st.data.dtype, device="cpu"), replica_id=_rank())
        _set(sharded, path, whole)
        fixes.append((path, st))
    return fixes


def _spec_alias(key: str) -> Optional[str]:
    """The same tensor's key under the other layer spec (local <-> Transformer Engine)."""
    from r1mega.convert.families import TE_RENAMES

    for local, te in TE_RENAMES.items():
        for a, b in ((local, te), (te, local)):
            if key.endswith("." + a):
                return key[: -len(a)] + b
    return None


def _follow_spec_renames(sharded: dict, stored: dict) -> int:
    """Point ShardedTensors at the other spec's key when only that one is stored, so a checkpoint
    written with the local spec loads into a TE-spec model and back (the norms are the same
    tensors; TE merely fuses them into the next linear)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    n = 0
    for _, st in _walk(sharded):
        if isinstance(st, ShardedTensor) and st.key not in stored:
            alias = _spec_alias(st.key)
            if alias is not None and alias in stored:
                st.key = alias
                n += 1
    return n


def load_model_state(model_chunks, path: str, strict: bool = True) -> dict:
    """Load ``path/model`` into the chunks (any layout); returns meta.json. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta = read_meta(path)
    model_dir = os.path.join(path, "model")
    if not os.path.isdir(model_dir):
        raise ConversionError(f"{model_dir} is missing: the checkpoint at {path} is incomplete.")
    sharded = model_sharded_state_dict(model_chunks)
    stored = dist_checkpointing.load_tensors_metadata(model_dir)
    _follow_spec_renames(sharded, stored)
    vocab_size = (meta.get("model_config") or {}).get("vocab_size")
    fixes = _repad_vocab_tensors(sharded, stored, vocab_size)
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    # Whole-tensor reads of the re-padded vocab are replicas megatron's access-pattern check
    # does not expect; skip that check (every rank, so the collectives match) only then.
    device = next(unwrap_chunk(model_chunks[0]).parameters()).device  # NCCL needs a GPU tensor
    repad = torch.tensor([1 if fixes else 0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(repad, op=dist.ReduceOp.MAX)
    loaded = dist_checkpointing.load(sharded, model_dir, strict=handling,
                                     validate_access_integrity=not bool(repad.item()))
    for p, st in fixes:
        whole = _get(loaded, p)  # (V_stored, H)
        off, rows = st.global_offset[0], st.data.shape[0]
        local = torch.zeros_like(st.data, device="cpu")
        real = max(0, min(off + rows, vocab_size) - off)
        local[:real] = whole[off: off + real]
        _set(loaded, p, local)
    for i, chunk in enumerate(model_chunks):
        unwrap_chunk(chunk).load_state_dict(loaded[f"model{i}"], strict=strict)
    return meta
