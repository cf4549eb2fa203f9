"""`r1mega bench decode-attention --smoke` runs on the CPU (the custom op's reference path) and
ends in one JSON line with both cache dtypes, the peer and the FP8 error figures."""
from __future__ import annotations

import json


def test_smoke_prints_one_json_line(capsys):
    from r1mega.bench import BENCHMARKS, decode_attention

    assert BENCHMARKS["decode-attention"] == "r1mega.bench.decode_attention"
    assert decode_attention.main(["--smoke"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "decode-attention" and set(out["rows"]) == {"fp32", "fp8"}
    fp8, fp32 = out["rows"]["fp8"], out["rows"]["fp32"]
    # K/V bytes: 1 per element + a 4-byte scale per row against 4 per element (fp32 on CPU).
    assert fp8["bytes"] < fp32["bytes"] / 2
    # The reference path is exact on the dequantised K/V; the e4m3 error shows against the rest.
    assert fp8["max_err_vs_dequantised"] < 1e-5 < fp8["max_err_vs_unquantised"] < 0.2
    assert out["fp8_speedup"] > 0 and out["sdpa_peer_us"] > 0
