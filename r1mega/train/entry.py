"""Command-line entry points of `r1mega train | sft | demo`: parse, load the config, hand over.

Kept apart from the trainer so that argument handling never mixes with the algorithm."""
from __future__ import annotations

import argparse

from r1mega.config import load_config, validate
from r1mega.parallel.launch_env import world_size_from_env


def _parse(prog: str, argv: list[str], config_required: bool = True):
    parser = argparse.ArgumentParser(prog=f"r1mega {prog}")
    parser.add_argument("config", nargs="?" if not config_required else None,
                        help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-6")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return validate(cfg, world_size=world_size_from_env())


def train_main(argv: list[str]) -> int:
    from r1mega.train.failures import exit_on_peer_failure
    from r1mega.train.trainer import run_train

    cfg = _parse("train", argv)
    return exit_on_peer_failure(lambda: run_train(cfg))


def sft_main(argv: list[str]) -> int:
    from r1mega.train.failures import exit_on_peer_failure
    from r1mega.train.trainer import run_sft

    cfg = _parse("sft", argv)
    return exit_on_peer_failure(lambda: run_sft(cfg))


def pipeline_main(argv: list[str]) -> int:
    from r1mega.pipeline.loop import run_pipeline
    from r1mega.train.failures import exit_on_peer_failure

    cfg = _parse("pipeline", argv)
    return exit_on_peer_failure(lambda: run_pipeline(cfg))


def demo_main(argv: list[str]) -> int:
    from r1mega.train.trainer import run_demo

    parser = argparse.ArgumentParser(prog="r1mega demo",
                                     description="SFT cold start then GRPO on a tiny model, on CPU.")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    return run_demo(args.overrides)
