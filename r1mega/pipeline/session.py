"""What every phase of a pipeline shares: the parallel runtime, tokenizers, reward scorers, the
metrics logger, the held-out prompts, and where each finished phase left its outputs.

Phases get the session and their own :class:`PhaseSpec`; they never see another phase's config.
Weights pass between phases only through checkpoints on disk (``<root>/phase_<k>/``), so a
resumed pipeline and an uninterrupted one start every phase from the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from r1mega.config import Config, ConfigError
from r1mega.parallel.runtime import seed_everything

DONE_FILE = "done.json"


def phase_dir(root: str, index: int) -> str:
    return os.path.join(root, f"phase_{index}")


def read_done(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, DONE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class Session:
    def __init__(self, cfg: Config, rt, logger, root: str):
        self.cfg, self.rt, self.logger, self.root = cfg, rt, logger, root
        self.done: dict[str, dict] = {}  # phase name -> its done.json
        self._tokenizers: dict = {}
        self._scorers: dict = {}
        self._eval_records = None
        self.specs: list = []  # the phase list (set by the loop), for the held-out set

    def log(self, *args) -> None:
        if self.rt.rank == 0:
            print("[r1mega]", *args, flush=True)

    # ---- shared objects ----------------------------------------------------------------------
    def tokenizer(self, cfg: Config):
        from r1mega.data.tokenizer import load_tokenizer

        spec = cfg.data.tokenizer
        if spec not in self._tokenizers:
            self._tokenizers[spec] = load_tokenizer(spec)
        tok = self._tokenizers[spec]
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer ({spec}) has {tok.vocab_size} ids but a phase's "
                              f"model.vocab_size={cfg.model.vocab_size}; raise it.")
        return tok

    def scorer(self, cfg: Config):
        """One reward pool per distinct rewards section (phases may override it)."""
        from r1mega.rewards.scorer import RewardScorer

        key = json.dumps([dataclasses.asdict(cfg.rewards), cfg.rollout.max_new_tokens],
                         sort_keys=True, default=str)
        if key not in self._scorers:
            self._scorers[key] = RewardScorer(cfg.rewards, max_new_tokens=cfg.rollout.max_new_tokens)
        return self._scorers[key]

    def eval_records(self) -> list:
        """Held-out prompts of the top-level data section (every phase is measured on the same),
        minus every prompt any phase trains or samples on (:meth:`training_sources`)."""
        from r1mega.data import build_prompt_source
        from r1mega.train.evaluate import heldout_records

        if self._eval_records is None:
            data = self.cfg.data
            self._eval_records = (heldout_records(build_prompt_source(data, eval=True),
                                                  self.training_sources())
                                  if data.eval_source else [])
        return self._eval_records

    def training_sources(self) -> list:
        """The top-level data source and each phase's own: a phase may train on more prompts, or
        other ones (its ``data`` section, ``train.sft_source``, a filter's ``mix_source``), and
        a held-out prompt must be one no phase has seen."""
        from r1mega.data import build_prompt_source
        from r1mega.train.sft import build_sft_source

        out, seen = [build_prompt_source(self.cfg.data)], set()
        for spec in self.specs:
            cfg, key = spec.cfg, None
            if spec.kind in ("grpo", "generate"):
                key = ("prompts", json.dumps(dataclasses.asdict(cfg.data), sort_keys=True,
                                             default=str))
                make = lambda cfg=cfg: build_prompt_source(cfg.data)
            elif spec.kind in ("sft", "distill") and not spec.input:
                key = ("sft", cfg.train.sft_source, json.dumps(dataclasses.asdict(cfg.data),
                                                               sort_keys=True, default=str))
                make = lambda cfg=cfg: build_sft_source(cfg.train, cfg.data)
            elif spec.kind == "filter" and spec.filter.mix_share and spec.filter.mix_source:
                mix = spec.filter.mix_source
                data = (dataclasses.replace(cfg.data, source=mix) if mix.startswith("builtin:")
                        else cfg.data)
                train = dataclasses.replace(cfg.train, sft_source=mix)
                key = ("sft", mix, json.dumps(dataclasses.asdict(data), sort_keys=True,
                                              default=str))
                make = lambda train=train, data=data: build_sft_source(train, data)
            if key is not None and key not in seen:
                seen.add(key)
                out.append(make())
        return out

    def close(self) -> None:
        for s in self._scorers.values():
            s.close()
        self._scorers.clear()

    # ---- weights -----------------------------------------------------------------------------
    def layout(self) -> dict:
        rt = self.rt
        return {"tp": rt.tp_size, "pp": rt.pp_size, "dp": rt.dp_size, "vpp": rt.vp_size,
                "world": rt.world_size}

    def build_policy(self, cfg: Config, total_steps: int):
        """A fresh policy; its random init is seeded by ``parallel.seed`` alone, so ``init: base``
        is the same weights in every phase (and in a resumed run)."""
        from r1mega.train.roles import Policy

        seed_everything(cfg.parallel.seed, self.rt.pp_rank)
        return Policy.build(cfg.model, cfg.precision, cfg.optimizer, self.rt,
                            distributed_optimizer=cfg.parallel.distributed_optimizer,
                            micro_batch_tokens=cfg.data.micro_batch_tokens,
                            total_steps=total_steps)

    def weights_of(self, name: str) -> str:
        done = self.done.get(name)
        if not done or not done.get("checkpoint"):
            raise ConfigError(f"phase '{name}' has no finished weights (its {DONE_FILE} names "
                              "no checkpoint); rerun the pipeline from that phase.")
        return done["checkpoint"]

    def load_weights(self, cfg: Config, path: str, policy) -> None:
        """A phase's checkpoint's weights into ``policy`` (its optimizer state is not loaded)."""
        from r1mega.train.checkpoint import CheckpointManager

        CheckpointManager(cfg.checkpoint, self.layout()).load(
            path, policy.chunks, policy.optim.optimizer, load_optimizer=False)

    def init_weights(self, spec, policy) -> None:
        """Load ``spec.init`` into ``policy``: base (random init or model.init_from_hf), an
        earlier phase's final checkpoint, or ``hf:DIR``; the optimizer always starts empty."""
        init = spec.init
        if init == "base":
            hf = spec.cfg.model.init_from_hf
        elif init.startswith("hf:"):
            hf = init[3:]
        else:
            path = self.weights_of(init)
            self.load_weights(spec.cfg, path, policy)
            self.log(f"{spec.key} '{spec.name}': weights from phase '{init}' ({path})")
            return
        if hf:
            from r1mega.convert.hf_bridge import load_hf_into_model

            load_hf_into_model(policy.chunks, hf, spec.cfg.model, self.rt,
                               optimizer=policy.optim.optimizer)
            self.log(f"{spec.key} '{spec.name}': weights from {hf}")
        else:
            self.log(f"{spec.key} '{spec.name}': weights from the base (random) init")

    def seed_phase(self, spec) -> None:
        """The phase's own random streams, independent of what earlier phases drew, so that a
        run resumed past them draws the same numbers."""
        seed_everything(spec.cfg.parallel.seed + 1000 * (spec.index + 1), self.rt.pp_rank)
