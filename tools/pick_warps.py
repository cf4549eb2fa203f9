"""Read a `bench decode-attention` log (last line JSON) and print the R1MEGA_PAGED_FP8_WARPS value
whose tensor-core row is fastest, or nothing when 4 (the default) is within 3 %."""
import json
import sys

rows = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["rows"]
us = {w: rows[name]["us"] for w, name in ((4, "fp8-mma"), (2, "fp8-mma-w2"), (1, "fp8-mma-w1")) if name in rows}
best = min(us, key=us.get)
print(best if best != 4 and us[best] < 0.97 * us[4] else "")
