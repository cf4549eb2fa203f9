"""`r1mega bench dsv3-rollout`: the rollout engine on MLA's latent KV cache vs transformers'
``DeepseekV3ForCausalLM.generate()`` of the same shape (``--model``, default ``dsv3-small``),
sampling at temperature 1, every sequence to its full length.

Reported per setting (prompts x prompt length -> new tokens): tokens/s of both and the ratio (the
issue's bar on the H200: >= 20x at 256 x 128 -> 256), the KV-cache bytes per token the engine
keeps (the latent row per layer) beside what per-head keys and values would take, and the fraction
of the decode roofline: (weights once per decode step + each sequence's cached latents) / the
device copy bandwidth measured in this run. ``--smoke``: tiny shape on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from r1mega.bench.rollout import _finite, _sync, copy_bandwidth, decode_bytes
from r1mega.bench.shapes import get_shape


def run_hf(shape, prompts: int, prompt_len: int, new: int, device) -> float:
    from r1mega.models.deepseek_v3.hf_peer import hf_deepseek_v3

    try:
        model = hf_deepseek_v3(shape, torch.bfloat16, device, experts_implementation="grouped_mm")
    except Exception:
        model = hf_deepseek_v3(shape, torch.bfloat16, device)
    model.eval()
    ids = torch.randint(0, shape["vocab_size"], (prompts, prompt_len), device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4, min_new_tokens=4, **kw)
        _sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **kw)
        _sync()
        dt = time.perf_counter() - t
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return (out.shape[1] - prompt_len) * prompts / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench dsv3-rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dsv3-small")
    ap.add_argument("--settings", default="256x128x256", help="comma-separated PROMPTSxLENxNEW")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers generate()")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    ap.add_argument("--no-compile", action="store_true", help="rollout.compile_decode=false")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    args = ap.parse_args(argv)

    from r1mega.config import ModelConfig, ParallelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import destroy_parallel, init_parallel
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    shape = get_shape(args.model, smoke=args.smoke)
    settings = [(4, 8, 8)] if args.smoke else [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    port = int(os.environ.get("MASTER_PORT", "29512"))
    rt = init_parallel(ParallelConfig(), PrecisionConfig(), env=LaunchEnv(0, 1, 0, "127.0.0.1", port, "single"))
    device = rt.device
    mcfg = ModelConfig(**{**shape, "max_position_embeddings": max(p + n for _, p, n in settings) + 8})
    model = build_model(mcfg, rt, wrap=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model[0].parameters())
    elem = torch.empty((), dtype=rt.dtype).element_size()
    a = mcfg.mla
    expanded_kv = mcfg.num_layers * mcfg.num_attention_heads * (a.q_head_dim + a.v_head_dim) * elem
    bw = copy_bandwidth(device)
    results, kv_per_token = {}, None
    for prompts, plen, new in settings:
        g = torch.Generator().manual_seed(prompts)
        ids = torch.randint(0, shape["vocab_size"], (prompts, plen), generator=g).tolist()
        rcfg = RolloutConfig(temperature=1.0, max_new_tokens=new, kv_memory_fraction=0.5,
                             max_batch_sequences=max(256, prompts), cuda_graphs=not args.no_graphs,
                             compile_decode=not args.no_compile, max_prefill_tokens=max(16384, prompts * plen // 4))
        eng = RolloutEngine(model, rcfg, rt, eos_ids=[], vocab_size=shape["vocab_size"])
        kv_per_token = eng.cache.shape.bytes_per_block // eng.cache.shape.block_tokens
        t = time.perf_counter()
        eng.generate([GenerationRequest(p, n=1, seed=i + 7919) for i, p in enumerate(ids)])  # warm-up
        _sync()
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        outs = eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(ids)])
        _sync()
        dt = time.perf_counter() - t
        assert sum(len(c.token_ids) for c in outs) == prompts * new, "every sequence runs to its length"
        eng.release()
        peer = float("nan") if args.no_peer else run_hf(shape, prompts, plen, new, device)
        floor_s = decode_bytes(weight_bytes, kv_per_token, prompts, plen, new) / bw
        ours = prompts * new / dt
        key = f"{prompts}x{plen}->{new}"
        results[key] = dict(rollout_tokens_per_s=ours, hf_tokens_per_s=peer, ratio=ours / peer, seconds=dt,
                            warmup_s=warm_s, roofline_fraction=floor_s / dt)
        print(f"[{key}] rollout {ours:,.0f} tok/s in {dt:.2f} s (warm-up {warm_s:.1f} s), HF {peer:,.0f} tok/s, "
              f"ratio {ours / peer:.1f}, roofline {floor_s / dt:.1%}", flush=True)
    destroy_parallel()
    print(f"dsv3-rollout: {args.model}{' (smoke)' if args.smoke else ''}, {weight_bytes / 1e9:.2f} GB of weights, "
          f"KV cache {kv_per_token} B/token (per-head keys and values would be {expanded_kv} B), "
          f"device copy {bw / 1e12:.2f} TB/s")
    print(json.dumps(_finite({"bench": "dsv3-rollout", "model": args.model, "smoke": args.smoke,
                              "kv_bytes_per_token": kv_per_token, "expanded_kv_bytes_per_token": expanded_kv,
                              "copy_bandwidth_Bps": bw, "settings": results,
                              "bar_20x_met": all(r["ratio"] >= 20 for r in results.values())})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
