"""`r1mega bench saved-activations`: bytes one decoder layer keeps for backward, r1mega beside
transformers, at a benchmark shape with one layer and fewer tokens.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` around the layer's forward: every
tensor autograd saves, by unique storage (a view keeps its whole storage alive), parameters
excluded. Per-token figures times the benchmark's tokens and layers estimate the activation part
of a train step's peak (what the optimizer state does not explain). The largest storages of each
model are listed, so a difference points at the op that keeps it.
"""
from __future__ import annotations

import argparse
import json

import torch

from r1mega.bench.shapes import get_shape


def count_saved(layer: torch.nn.Module, run) -> dict:
    """{storage ptr: (bytes, shape, dtype)} of what autograd saves inside ``layer``'s forward."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = (st.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    pre = layer.register_forward_pre_hook(lambda *a: ctx.__enter__())
    post = layer.register_forward_hook(lambda *a: ctx.__exit__(None, None, None))
    try:
        run()
    finally:
        pre.remove()
        post.remove()
    return seen


def _r1mega(shape, ids, rt, precision):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    model = build_model(ModelConfig(**shape), rt, precision, wrap=False)[0]
    positions = torch.arange(ids.shape[1], device=ids.device)[None]

    def run():
        out = model(input_ids=ids, position_ids=positions, attention_mask=None)
        out = out.logits if hasattr(out, "logits") else out
        out.float().sum().backward()

    return count_saved(model.decoder.layers[0], run)


def _transformers(shape, ids, device, dtype, experts):
    from r1mega.bench.hf_peer import build_hf_model

    model, impl = build_hf_model(shape, device, dtype, experts)
    model.train()
    return count_saved(model.model.layers[0], lambda: model(input_ids=ids, labels=ids).loss.backward()), impl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench saved-activations", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-moe-small")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens in the measured forward")
    ap.add_argument("--bench-tokens", type=int, default=8192, help="tokens per step to scale to")
    ap.add_argument("--hf-experts", default="grouped_mm")
    ap.add_argument("--top", type=int, default=12, help="largest storages listed per model")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, end-to-end check")
    args = ap.parse_args(argv)

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    shape = get_shape(args.model, smoke=args.smoke)
    layers = shape["num_layers"]
    shape["num_layers"] = 1
    if args.smoke:
        args.tokens, args.bench_tokens = 64, 128
    precision = PrecisionConfig(dtype="bf16")
    rt = init_parallel(ParallelConfig(), precision, env=read_launch_env())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, args.tokens), generator=g).to(rt.device)
    rows = {"r1mega": _r1mega(shape, ids, rt, precision)}
    experts = None if args.hf_experts == "default" else args.hf_experts
    hf, impl = _transformers(shape, ids, rt.device, torch.bfloat16, experts)
    rows[f"transformers[{impl}]"] = hf
    destroy_parallel()

    result = {"model": args.model, "tokens": args.tokens, "device": str(rt.device),
              "layers": layers, "bench_tokens": args.bench_tokens, "impls": {}}
    print(f"saved-activations --model {args.model}: one layer, {args.tokens} tokens, bf16, "
          f"{rt.device}; scaled to {layers} layers x {args.bench_tokens} tokens")
    for name, seen in rows.items():
        total = sum(b for b, _, _ in seen.values())
        per_token = total / args.tokens
        scaled_gb = per_token * args.bench_tokens * layers / 1e9
        print(f"{name:<32}{per_token:>12.0f} B/token/layer{scaled_gb:>10.2f} GB at the bench size")
        for b, s, d in sorted(seen.values(), reverse=True)[:args.top]:
            print(f"    {b / args.tokens:>10.0f} B/token  {s} {d}")
        result["impls"][name] = {"bytes_per_token_per_layer": per_token, "scaled_gb": scaled_gb,
                                 "largest": [[b / args.tokens, list(s), d] for b, s, d in
                                             sorted(seen.values(), reverse=True)[:args.top]]}
    names = list(result["impls"])
    result["r1mega_vs_transformers"] = (result["impls"][names[0]]["bytes_per_token_per_layer"] /
                                        result["impls"][names[1]]["bytes_per_token_per_layer"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
