"""`r1mega train | sft | demo | generate | reward | convert | bench NAME`.

Each subcommand imports its module lazily: `r1mega reward` must not pay for megatron-core, and a
broken optional dependency of one command must not take the others down.

Bad input of any kind (r1mega.errors.UserError: config keys, data files and rows, HF directories,
checkpoints, prompt files, the launch environment) is caught here, once, and printed as one line
with exit code 2; R1MEGA_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help). Functions take argv (list[str]) and return an exit code.
COMMANDS = {
    "demo": ("r1mega.train.entry", "demo_main", "the embedded default: SFT cold start, then GRPO, on CPU"),
    "train": ("r1mega.train.entry", "train_main", "GRPO training: r1mega train CONFIG [key=value ...]"),
    "pipeline": ("r1mega.train.entry", "pipeline_main", "the phase-based trainer: r1mega pipeline CONFIG [key=value ...]"),
    "sft": ("r1mega.train.entry", "sft_main", "supervised fine-tuning: r1mega sft CONFIG [key=value ...]"),
    "generate": ("r1mega.rollout.generate_cli", "main", "sample completions: r1mega generate CONFIG --prompts F --out F"),
    "reward": ("r1mega.rewards.cli", "main", "score completions: r1mega reward --input FILE.jsonl"),
    "convert": ("r1mega.convert.cli", "main", "checkpoint conversion: r1mega convert hf-to-mcore|mcore-to-hf ..."),
    "bench": ("r1mega.bench", "main", "benchmarks: r1mega bench NAME (list: r1mega bench --list)"),
}


def _usage() -> str:
    lines = ["usage: r1mega COMMAND [args]", "", "commands:"]
    width = max(len(n) for n in COMMANDS)
    for name, (_, _, doc) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {doc}")
    return "\n".join(lines)


def _quiet_known_warnings() -> None:
    """Warnings every CPU run would print once per collective or import, which bury the step lines:
    megatron-core calling torch's renamed collectives, and apex/TE absence (r1mega reports which
    paths it uses itself)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
    # megatron's TransformerConfig warns on its own default cuda_graph_scope, which r1mega does not use.
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"r1mega: unknown command '{name}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    _quiet_known_warnings()
    from r1mega.config import ConfigError
    from r1mega.rewards.registry import RewardSetupError
    from r1mega.train.reward_errors import RewardErrorRateError
    from r1mega.errors import UserError, debug_enabled, report_user_error

    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        code = func(rest)
    except UserError as exc:
        if debug_enabled():
            raise
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        return report_user_error(exc, f"r1mega {name}: {kind}")
    except (RewardSetupError, RewardErrorRateError) as exc:
        # Each message names the reward and the cause; a traceback would only bury it.
        print(f"r1mega {name}: reward error: {exc}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
