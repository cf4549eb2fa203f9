"""Training checkpoints: megatron dist_checkpointing, atomic, keep-last-K, corruption fallback.

Layout of one checkpoint (``<checkpoint.dir>/step_00000042/``)::

    model/        dist_checkpointing of the model's sharded state dict (the same format the
                  converter writes, so `r1mega generate` and `convert mcore-to-hf` read it as is)
    optimizer/    dist_checkpointing of the optimizer's sharded state (fully_sharded_model_space:
                  reshardable onto any TP/PP/DP layout)
    rank_00003.pt per-rank state that has no global meaning (RNG states)
    trainer.json  step, scheduler, data cursor, metrics history, layout it was written under
    manifest.json every file with its size and sha256, written last: a checkpoint without a
                  valid manifest is partial or corrupt and is skipped with a warning.

Everything is first written under ``.tmp-step_…`` and renamed when complete, so a crash mid-save
never leaves something that looks like a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from r1mega.errors import UserError

log = logging.getLogger("r1mega.checkpoint")

_STEP_RE = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the directory."""


# ----------------------------------------------------------------------------- helpers


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_list(root: str) -> list[str]:
    out = []
    for base, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), root)
            if rel != "manifest.json":
                out.append(rel)
    return sorted(out)


def write_manifest(root: str) -> None:
    files = {rel: {"bytes": os.path.getsize(os.path.join(root, rel)),
                   "sha256": _sha256(os.path.join(root, rel))} for rel in _file_list(root)}
    tmp = os.path.join(root, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT_VERSION, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "manifest.json"))


def verify_checkpoint(root: str) -> Optional[str]:
    """None when ``root`` is complete and intact, else the reason it is not."""
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        return "no manifest.json (partial write?)"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable manifest.json: {exc}"
    for rel, want in files.items():
        full = os.path.join(root, rel)
        if not os.path.exists(full):
            return f"missing file {rel}"
        if os.path.getsize(full) != want["bytes"]:
            return f"file {rel} has {os.path.getsize(full)} bytes, manifest says {want['bytes']}"
        if _sha256(full) != want["sha256"]:
            return f"file {rel} fails its sha256 check"
    extra = set(_file_list(root)) - set(files)
    if extra:
        return f"files not in the manifest: {sorted(extra)[:3]}"
    return None


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every finished-looking checkpoint under ``root``, newest first."""
    if not root or not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core import tensor_parallel

            state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        except Exception:  # noqa: BLE001 - tracker absent on CPU mode
            pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def model_sharded_state_dict(model_chunks: list) -> dict:
    """One entry per virtual-pipeline chunk; the ShardedTensor keys inside are global, so the
    nesting here does not tie a checkpoint to a layout."""
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_obj(obj: Any) -> Any:
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- manager


@dataclass
class LoadedState:
    step: int
    path: str
    trainer_state: dict


class CheckpointManager:
    """Saves and restores the whole training state; every rank calls every method."""

    def __init__(self, ckpt_cfg, layout: dict):
        # layout: {"tp":..,"pp":..,"dp":..,"vpp":..,"world":..}; resume onto another layout works,
        # but per-rank RNG streams only carry over when the layout is identical.
        self.cfg = ckpt_cfg
        self.layout = dict(layout)
        self.root = ckpt_cfg.dir

    def _optim_meta(self) -> dict:
        # fully_reshardable: any TP/PP/DP layout can load it (state gathered per DP group at save).
        # dp_reshardable: fully parallel, no gather, but only DP may change between save and load.
        return {"distrib_optim_sharding_type": self.cfg.optimizer_format}

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, model_chunks: list, optimizer=None, trainer_state: dict | None = None) -> str:
        from megatron.core import dist_checkpointing

        if not self.root:
            raise CheckpointError("checkpoint.dir is not set; set checkpoint.dir=PATH to save.")
        final = os.path.join(self.root, f"step_{step:08d}")
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}")
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "model"))
            if optimizer is not None:
                os.makedirs(os.path.join(tmp, "optimizer"))
        _barrier()
        t0 = time.perf_counter()
        # save() preprocesses the dict in place, so the optimizer gets a fresh model dict to
        # link its state to the original Parameters.
        dist_checkpointing.save(model_sharded_state_dict(model_chunks), os.path.join(tmp, "model"))
        if optimizer is not None:
            optim_sd = optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks),
                                                    is_loading=False, metadata=self._optim_meta())
            dist_checkpointing.save(optim_sd, os.path.join(tmp, "optimizer"))
        torch.save({"rng": rng_state()}, os.path.join(tmp, f"rank_{_rank():05d}.pt"))
        _barrier()
        if _rank() == 0:
            meta = {"format": FORMAT_VERSION, "step": step, "layout": self.layout,
                    "time": time.time(), "trainer": trainer_state or {}}
            with open(os.path.join(tmp, "trainer.json"), "w") as f:
                json.dump(meta, f, indent=1, default=_json_default)
            write_manifest(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
        _barrier()
        return final

    def _prune(self) -> None:
        keep = max(int(self.cfg.keep_last), 1)
        for _, path in list_checkpoints(self.root)[keep:]:
            shutil.rmtree(path, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------
    def find_latest_valid(self, root: Optional[str] = None) -> Optional[str]:
        """Rank 0 checks the newest checkpoints in turn and all ranks get its verdict."""
        root = root or self.root
        choice = None
        if _rank() == 0:
            candidates = list_checkpoints(root)
            if not candidates and root and os.path.exists(os.path.join(root, "manifest.json")):
                candidates = [(-1, root)]  # root is itself one checkpoint
            for _, path in candidates:
                reason = verify_checkpoint(path)
                if reason is None:
                    choice = path
                    break
                # One line on stdout; a logging call too would print it twice (logging's last-
                # resort handler writes warnings to stderr when nothing is configured).
                print(f"[r1mega] WARNING: checkpoint {path} is unusable ({reason}); "
                      f"falling back to the previous one", flush=True)
        return _broadcast_obj(choice)

    def load(self, path: str, model_chunks: list, optimizer=None, load_optimizer: bool = True) -> LoadedState:
        from megatron.core import dist_checkpointing

        with open(os.path.join(path, "trainer.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}/trainer.json: format {meta.get('format')} is not "
                                  f"{FORMAT_VERSION}; this r1mega cannot read it.")
        want_optim = (optimizer is not None and load_optimizer
                      and os.path.isdir(os.path.join(path, "optimizer")))
        if want_optim:
            # A fresh optimizer has no Adam state to load into; megatron fills it with a dummy step
            # on zero grads. That step may touch the weights (weight decay), so it comes before
            # the model is loaded.
            _materialise_optimizer_state(optimizer)
        model_sd = model_sharded_state_dict(model_chunks)
        loaded = dist_checkpointing.load(model_sd, os.path.join(path, "model"))
        for i, chunk in enumerate(model_chunks):
            _unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        if optimizer is not None and not want_optim:
            # Weights only: the fp32 master copies a bf16 optimizer steps must follow them, or its
            # first step would write the weights it was built with back into the model.
            optimizer.reload_model_params()
        if want_optim:
            model_sd = model_sharded_state_dict(model_chunks)
            optim_sd = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                    metadata=self._optim_meta())
            from torch.distributed.checkpoint.api import CheckpointException

            try:
                optimizer.load_state_dict(dist_checkpointing.load(optim_sd, os.path.join(path, "optimizer")))
            except (Exception, CheckpointException) as exc:  # the latter is a BaseException
                _explain_lean_mismatch(path, optimizer, exc)
                raise
            _unshare_adam_steps(optimizer)
        rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
        if meta.get("layout") == self.layout and os.path.exists(rank_file):
            set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
        elif _rank() == 0:
            print(f"[r1mega] resuming {path} written under layout {meta.get('layout')} onto "
                  f"{self.layout}: weights, optimizer and data cursor carry over; per-rank RNG "
                  f"streams are re-seeded.", flush=True)
        _barrier()
        return LoadedState(step=int(meta["step"]), path=path, trainer_state=meta.get("trainer", {}))


def _explain_lean_mismatch(path: str, optimizer, exc: BaseException) -> None:
    """A lean optimizer (r1mega/train/lean_adam.py) whose state keys the checkpoint lacks (a
    bf16_remainder run resuming a checkpoint without remainders) fails deep inside
    torch.distributed.checkpoint; say which settings to resume with instead. Moment dtypes
    convert on load, and a checkpoint's extra remainders are dropped (its bf16 weights are the
    rounded masters), so those resumes work."""
    from r1mega.train.lean_adam import lean_optimizers

    lean = lean_optimizers(optimizer)
    if not lean or isinstance(exc, CheckpointError):
        return
    raise CheckpointError(
        f"{path}/optimizer does not hold the state of optimizer.master_weights="
        f"{lean[0].master_weights}, optimizer.moments_dtype={lean[0].moments_dtype} (a "
        f"bf16_remainder optimizer needs the int16 remainders only a bf16_remainder run saves); "
        f"resume with the optimizer settings it was saved under. ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200]})") from exc


def _fix_adam_step_on_reshardable_load() -> None:
    """megatron-core 0.16.1 drops torch Adam's per-parameter "step" from the tensors it copies in
    `fully_reshardable` loads, then indexes them with every key of the live state, "step"
    included (KeyError). Copying the live step onto itself is a no-op; load_state_dict sets the
    real step from the checkpoint's param_groups right after."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_r1mega_fixed", False):
        return

    def fixed(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live = self.optimizer.state.get(main_param, {})
            if "step" in live:
                tensors = {**tensors, "step": live["step"]}
        return original(self, model_param, tensors)

    fixed._r1mega_fixed = True
    DistributedOptimizer._set_main_param_and_optimizer_states = fixed


def _unshare_adam_steps(optimizer) -> None:
    """megatron's load_state_dict gives every parameter's torch-Adam state the SAME "step" tensor;
    torch increments it in place once per parameter, so bias correction would run ahead by the
    number of parameters at every step after a resume. One tensor each, as torch keeps them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _materialise_optimizer_state(optimizer) -> None:
    _fix_adam_step_on_reshardable_load()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and len(inner.state) == 0 and hasattr(
                opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"trainer state holds {type(obj).__name__}, which JSON cannot store")
