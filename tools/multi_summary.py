"""Summary of tools/gpu_multi.sh: one row per run from $OUT/runs.tsv, the key figures of each
run's last JSON line, and $OUT/summary.json with all of them.

    python tools/multi_summary.py OUT_DIR

runs.tsv rows (tab-separated): part, label, exit code, wall seconds, log file name. A run whose
log has no JSON last line (it failed or ran out of time) shows its exit code and no figures.
"""
from __future__ import annotations

import json
import os
import sys

# part -> (JSON key, format) of the figures its row shows
FIGURES = {
    "dp": [("tokens_per_s_per_gpu", "{:,.0f} tok/s/GPU"), ("efficiency_vs_ref", "eff {:.1%}"),
           ("mfu", "MFU {:.1%}"), ("ms_per_step", "{:.0f} ms/step")],
    "ep": [("tokens_per_s_per_gpu", "{:,.0f} tok/s/GPU"), ("all_to_all_ms_per_step", "a2a {:.1f} ms/step"),
           ("all_to_all_fraction", "({:.1%})"), ("efficiency_vs_ref", "eff {:.1%}")],
    "8b": [("tokens_per_s_per_gpu", "{:,.0f} tok/s/GPU"), ("mfu", "MFU {:.1%}"),
           ("peak_memory_gb_max_rank", "peak {:.0f} GB"), ("ms_per_step", "{:.0f} ms/step")],
    "rollout": [("tokens_per_s", "{:,.0f} tok/s"), ("roofline_fraction", "roofline {:.1%}"),
                ("ranks_agree", "agree={}")],
    "grpo": [("tokens_per_s", "{:,.0f} tok/s"), ("split", "split {}")],
    "fail": [("ok", "ok={}")],
    "equiv": [("passed", "{} passed"), ("failed", "{} failed"), ("skipped", "{} skipped")],
}


def last_json(path: str):
    if not os.path.exists(path):
        return None
    for line in reversed(open(path, errors="replace").read().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def pytest_counts(path: str) -> dict:
    """{passed: n, failed: n, ...} from pytest's last summary line."""
    import re

    if not os.path.exists(path):
        return {}
    tail = [ln for ln in open(path, errors="replace").read().splitlines()
            if re.search(r"\d+ (passed|failed|error)", ln) and " in " in ln]
    out = {}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail[-1] if tail else ""):
        out[word.rstrip("s") if word.startswith("error") else word] = int(n)
    return out


def grpo_figures(rec: dict) -> dict:
    """tools/grpo_run_summary.py's JSON -> end-to-end completion tokens/s and the step split."""
    split = rec.get("time_split_s") or {}
    return {"tokens_per_s": rec.get("completion_tokens_per_s"),
            "split": "/".join(f"{k} {v:.2f}s" for k, v in split.items() if isinstance(v, (int, float)))}


def main(argv=None) -> int:
    out_dir = (argv or sys.argv[1:] or [os.environ.get("OUT", "/tmp/r1mega-out")])[0]
    runs_path = os.path.join(out_dir, "runs.tsv")
    rows = []
    if os.path.exists(runs_path):
        for line in open(runs_path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 5:
                rows.append(parts)
    summary = []
    print(f"{'part':<8}{'run':<30}{'rc':>5}{'s':>6}  figures")
    for part, label, rc, secs, log in rows:
        path = os.path.join(out_dir, log)
        rec = pytest_counts(path) if part == "equiv" else last_json(path)
        if part == "grpo" and rec:
            rec = {**rec, **grpo_figures(rec)}
        figs = []
        for key, fmt in FIGURES.get(part, []):
            if rec and rec.get(key) is not None:
                try:
                    figs.append(fmt.format(rec[key]))
                except (ValueError, TypeError):
                    figs.append(f"{key}={rec[key]}")
        if rc not in ("0", "skipped") and not figs:
            figs.append(f"see {log}")
        print(f"{part:<8}{label:<30}{rc:>5}{secs:>6}  {'  '.join(figs)}")
        summary.append({"part": part, "run": label, "rc": rc, "seconds": secs, "log": log, "result": rec})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
