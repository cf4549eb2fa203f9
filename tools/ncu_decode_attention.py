"""Nsight Compute on the FP8 decode attention kernel (csrc/paged_decode_mma.cuh) as
`r1mega bench decode-attention` runs it: throughput against the memory's peak, achieved
occupancy, and where the warps stall, for the next change to aim at (it runs at 72-77 % of its
bytes floor). Prints ncu's report; says so plainly where the GPU's counters are not open to us.
  python3 tools/ncu_decode_attention.py [CTX] [KERNEL_REGEX]   (default 384, paged_decode_fp8_mma)"""
import os
import shutil
import subprocess
import sys

SECTIONS = ["SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats",
            "SchedulerStats"]


def main() -> int:
    ctx = sys.argv[1] if len(sys.argv) > 1 else "384"
    regex = sys.argv[2] if len(sys.argv) > 2 else "paged_decode_fp8_mma"
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
        print("ncu: not found on this machine")
        return 1
    cmd = [ncu, "--kernel-name", f"regex:{regex}", "--launch-skip", "3", "--launch-count", "1"]
    for s in SECTIONS:
        cmd += ["--section", s]
    cmd += [sys.executable, "-m", "r1mega.cli", "bench", "decode-attention", "--min-ctx", ctx,
            "--max-ctx", ctx, "--reps", "5"]
    print(" ".join(cmd), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True)
    out = run.stdout + run.stderr
    if "ERR_NVGPUCTRPERM" in out:
        print("ncu: the GPU's performance counters are not open to this user (ERR_NVGPUCTRPERM)")
    keep = [ln for ln in out.splitlines() if not ln.startswith("==PROF==") or "Error" in ln]
    print("\n".join(keep[-200:]))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
