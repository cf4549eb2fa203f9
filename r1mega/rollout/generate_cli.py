"""`r1mega generate CONFIG --prompts FILE.jsonl --out FILE.jsonl [key=value ...]`.

Samples ``rollout.group_size`` completions per prompt with the rollout engine, from the weights
of ``checkpoint.load`` (a checkpoint directory, or a training run's checkpoint root: the newest
step is taken), else ``model.init_from_hf``, else the model's initial weights.

Prompt rows (JSONL, one object a line): ``{"prompt": "text"}`` (encoded as is),
``{"messages": [{"role": ..., "content": ...}]}`` (the tokenizer's chat template), or
``{"prompt_ids": [ints]}``; optional per-row ``n``, ``seed``, ``max_new_tokens``, ``temperature``,
``top_p``, ``top_k``, ``stop``. Output rows: prompt_index, sample_index, completion (text),
token_ids, num_tokens, logprobs, finish_reason, stop_reason; in prompt order.

Data parallel: each DP rank generates its own share of the prompts; rank 0 writes the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from r1mega.config import ConfigError, load_config, validate
from r1mega.errors import UserFileError, UserValueError

_ROW_KEYS = {"prompt", "messages", "prompt_ids", "n", "seed", "max_new_tokens", "temperature",
             "top_p", "top_k", "stop", "id", "answer", "task"}


def _parse(argv) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="r1mega generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML config (model, parallel, rollout, data.tokenizer, checkpoint.load)")
    ap.add_argument("--prompts", required=True, help="JSONL of prompts")
    ap.add_argument("--out", required=True, help="JSONL to write completions to")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_known_args(argv)


def read_prompt_rows(path: str, tokenizer, on_bad_row: str = "error") -> tuple[list[dict], int]:
    """(rows with 'prompt_ids' filled in, number skipped). Errors name file:line and the fix."""
    if not os.path.isfile(path):
        raise UserFileError(f"--prompts {path} does not exist; give a JSONL file of "
                            '{"prompt": ...}, {"messages": [...]} or {"prompt_ids": [...]} rows.')
    rows, skipped = [], 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")
                if "prompt_ids" in row:
                    ids = [int(t) for t in row["prompt_ids"]]
                elif "messages" in row:
                    ids = tokenizer.encode(tokenizer.apply_chat_template(row["messages"]))
                elif "prompt" in row:
                    ids = tokenizer.encode(str(row["prompt"]))
                else:
                    raise ValueError("needs one of 'prompt', 'messages' or 'prompt_ids'")
                if not ids:
                    raise ValueError("the prompt encodes to zero tokens")
            except (ValueError, TypeError, KeyError) as exc:
                if on_bad_row == "skip":
                    skipped += 1
                    continue
                raise UserValueError(f"{path}:{lineno}: bad prompt row ({exc}). Fix the row or set "
                                 f"data.on_bad_row=skip.") from None
            row["prompt_ids"] = ids
            rows.append(row)
    return rows, skipped


def resolve_checkpoint(path: str) -> str:
    """A step directory holding model/, or the newest step under a checkpoint root."""
    if os.path.isdir(os.path.join(path, "model")):
        return path
    from r1mega.train.checkpoint import list_checkpoints

    for _, step_dir in list_checkpoints(path):
        if os.path.isdir(os.path.join(step_dir, "model")):
            return step_dir
    raise UserFileError(f"checkpoint.load={path}: no model/ directory there nor in any "
                        f"step_XXXXXXXX/ below it; give a checkpoint step directory or root.")


def load_weights(model, cfg, rt) -> str:
    """Fill the model's weights from the config; returns where they came from."""
    if cfg.checkpoint.load:
        path = resolve_checkpoint(cfg.checkpoint.load)
        if os.path.isfile(os.path.join(path, "meta.json")):
            from r1mega.convert.mcore_io import load_model_state

            load_model_state(model, path)
        else:  # a training checkpoint: the same dist_checkpointing model/ without meta.json
            from megatron.core import dist_checkpointing

            from r1mega.convert.mcore_io import model_sharded_state_dict, unwrap_chunk

            loaded = dist_checkpointing.load(model_sharded_state_dict(model), os.path.join(path, "model"))
            for i, chunk in enumerate(model):
                unwrap_chunk(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        return path
    if cfg.model.init_from_hf:
        from r1mega.convert.hf_bridge import load_hf_into_model

        load_hf_into_model(model, cfg.model.init_from_hf, cfg.model, rt)
        return cfg.model.init_from_hf
    return "initial weights (parallel.seed)"


def _requests(rows, cfg):
    from r1mega.rollout.types import GenerationRequest

    reqs = []
    for i, row in enumerate(rows):
        reqs.append(GenerationRequest(
            prompt_ids=row["prompt_ids"], n=int(row.get("n", cfg.rollout.group_size)),
            seed=int(row.get("seed", cfg.rollout.seed + i)),
            max_new_tokens=row.get("max_new_tokens"), temperature=row.get("temperature"),
            top_p=row.get("top_p"), top_k=row.get("top_k"), stop=row.get("stop"),
        ))
    return reqs


def _write(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    args, overrides = _parse(list(sys.argv[1:] if argv is None else argv))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected arguments {bad}; overrides look like key.sub=value.")
    cfg = load_config(args.config, overrides)
    from r1mega.parallel.launch_env import world_size_from_env

    validate(cfg, world_size=world_size_from_env())

    import torch.distributed as dist

    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import destroy_parallel, init_parallel
    from r1mega.rollout.engine import RolloutEngine

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    rows, skipped = read_prompt_rows(args.prompts, tokenizer, cfg.data.on_bad_row)
    rt = init_parallel(cfg.parallel, cfg.precision)
    try:
        model = build_model(cfg.model, rt, cfg.precision, wrap=False)
        source = load_weights(model, cfg, rt)
        eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", -1) is not None and tokenizer.eos_id >= 0 else []
        engine = RolloutEngine(model, cfg.rollout, rt, eos_ids=eos, decode_fn=tokenizer.decode,
                               vocab_size=min(cfg.model.vocab_size, tokenizer.vocab_size))
        mine = list(range(rt.dp_rank, len(rows), rt.dp_size))
        reqs = _requests(rows, cfg)
        total = sum(reqs[i].n for i in mine)
        bar = None
        if rt.rank == 0 and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="generate", unit="completion", file=sys.stderr)
        outs = engine.generate([reqs[i] for i in mine], progress=bar.update if bar else None)
        if bar:
            bar.close()
        stats = dict(engine.stats)
        engine.release()
        records = []
        for c in outs:
            p = mine[c.prompt_index]
            records.append({
                "prompt_index": p, "sample_index": c.sample_index,
                **({"id": rows[p]["id"]} if "id" in rows[p] else {}),
                "completion": c.text, "token_ids": c.token_ids, "num_tokens": len(c.token_ids),
                "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        if rt.world_size > 1:
            gathered = [None] * rt.world_size if rt.rank == 0 else None
            # One copy per DP rank is enough: TP ranks of a model hold the same completions.
            dist.gather_object(records if rt.tp_rank == 0 else [], gathered, dst=0)
            if rt.rank == 0:
                records = [r for part in gathered for r in part]
        if rt.rank == 0:
            records.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
            _write(args.out, records)
            print(f"r1mega generate: {len(records)} completions of {len(rows)} prompts "
                  f"({skipped} rows skipped) from {source} -> {args.out}; "
                  f"{stats.get('new_tokens', 0)} tokens at {stats.get('tokens_per_s', 0):.1f} tokens/s "
                  f"on rank 0", file=sys.stderr)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
