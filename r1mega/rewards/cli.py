"""``r1mega reward --input FILE.jsonl [--config CONFIG.yaml] [--out FILE]``: debug rewards by hand.

Each input line is ``{"kind": ..., "completion": ..., "reference": {...}}`` (optionally
``truncated`` and ``num_tokens``); each output line is ``{"line": N, "score": total,
"components": {...}, "reasons": {...}, "error": ...}``. A line that is not valid JSON, or not an
object, gets ``{"line": N, "error": "..."}`` and the others are still scored.

``kind`` is a task kind (its weighted spec) or any registered reward's name (that reward alone).
Before the first line of a kind is scored, the rewards it uses run their self-checks; one that
fails is reported on stderr, the lines are still scored (each carries its error) and the exit
code is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from r1mega.config import load_config
from r1mega.rewards.registry import RewardSetupError
from r1mega.rewards.scorer import RewardScorer

_BATCH_LINES = 256


def _parse_line(text: str, lineno: int, path: str):
    try:
        item = json.loads(text)
    except ValueError as exc:
        return None, f"{path}:{lineno}: not valid JSON ({exc})"
    if not isinstance(item, dict):
        return None, f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}"
    if not isinstance(item.get("completion"), str):
        return None, f"{path}:{lineno}: 'completion' must be a string"
    if "kind" not in item:
        return None, f"{path}:{lineno}: 'kind' is missing (e.g. \"math\", \"code\", \"countdown\")"
    return item, None


def _self_check(scorer, batch, checked: set) -> bool:
    """Self-check the rewards of the batch's kinds not seen yet; False when one cannot run."""
    kinds = {item["kind"] for _, item in batch if isinstance(item["kind"], str)} - checked
    checked |= kinds
    try:
        scorer.self_check({k for k in kinds if scorer.spec_for(k) is not None})
    except RewardSetupError as exc:
        print(f"r1mega reward: reward error: {exc}", file=sys.stderr)
        return False
    return True


def _flush(scorer, batch, out) -> None:
    if not batch:
        return
    scored = scorer.score([item for _, item in batch])
    for (lineno, _), res in zip(batch, scored):
        out.write(json.dumps({"line": lineno, "score": res.total, "components": res.components,
                              "reasons": res.reasons, "error": res.error}) + "\n")
    batch.clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega reward", description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="JSONL file of {kind, completion, reference}")
    ap.add_argument("--config", default=None, help="YAML config; its 'rewards' section is used")
    ap.add_argument("--out", default=None, help="output JSONL (default: stdout)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rewards.timeout_s=20")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"r1mega reward: --input {args.input} is not a file.", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    out = open(args.out, "w") if args.out else sys.stdout
    checked: set = set()
    setup_ok = True
    try:
        with RewardScorer(cfg.rewards, max_new_tokens=cfg.rollout.max_new_tokens) as scorer, \
                open(args.input, encoding="utf-8") as f:
            batch = []
            for lineno, text in enumerate(f, 1):
                if not text.strip():
                    continue
                item, error = _parse_line(text, lineno, args.input)
                if error:
                    setup_ok &= _self_check(scorer, batch, checked)
                    _flush(scorer, batch, out)  # keep output in input order
                    out.write(json.dumps({"line": lineno, "score": None, "error": error}) + "\n")
                    continue
                batch.append((lineno, item))
                if len(batch) >= _BATCH_LINES:
                    setup_ok &= _self_check(scorer, batch, checked)
                    _flush(scorer, batch, out)
            setup_ok &= _self_check(scorer, batch, checked)
            _flush(scorer, batch, out)
    finally:
        if args.out:
            out.close()
    return 0 if setup_ok else 1


if __name__ == "__main__":
    sys.exit(main())
