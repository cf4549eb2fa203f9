"""`r1mega bench decode-attention`: the paged decode kernel on a bf16 cache vs an FP8 cache.

One layer of decode attention at the rollout bench's shape (852M: 16 query heads over 4 KV heads
of 128, 16-token blocks), ``--seqs`` sequences whose contexts spread evenly over
``--min-ctx..--max-ctx`` (default 128..384: the contexts of a 128 -> 256 rollout), blocks
scattered over the cache. Reported per cache dtype: microseconds per call, the bytes the call
must read (K/V rows of every context token, the FP8 cache's scales, q, block tables) and that
over the measured device-copy bandwidth (the bytes floor), and the FP8 kernel's error against
float64 attention on the dequantised K/V and on the unquantised K/V. The peer is SDPA on a
contiguous (unpaged) bf16 cache padded to the longest context, the same call the training
forward's attention makes. The ratio bf16 / FP8 time is what ``rollout.kv_cache_dtype=fp8``
can take off the attention share of a decode step.

On the GPU both paged kernels are also timed directly, whatever ``R1MEGA_PAGED_DECODE`` chose
for the op's rows: ``*-rows`` (a group's query heads on the dots' M axis) and ``*-keys`` (keys
on it), bf16 and FP8 caches, the FP8 ones also with fp16 dots, and ``fp8-cuda`` / ``fp8-mma``
(the CUDA-core and tensor-core kernels of r1mega/rollout/cuda_paged.py, where its extension loads), each with its error against
float64 attention on its cache's values; ``bf16-rows-heads`` and ``fp8-mma-heads`` launch the
(Hkv, B) grid (``R1MEGA_PAGED_GRID=heads``); ``fp8-mma-w2`` and ``-w1`` give a KV head 2 and 1
warps instead of 4 (``R1MEGA_PAGED_FP8_WARPS``); ``fp8-mma+row-kernel`` adds the one-pass row
quantiser that the FP8 rollout's o_proj runs after it, and ``fp8-mma+cluster-rows`` writes those
rows in the kernel itself (``R1MEGA_PAGED_FP8_ROWS_CLUSTER``, Hopper); ``fp8-rope-kernel+mma``
is the decode step's RoPE kernel and then the tensor-core one, ``fp8-mma-rope`` both in one
(``R1MEGA_PAGED_FP8_ROPE``).

``--block-n 32,64,128`` (GPU): also time the default kernel directly at each keys-per-tile size,
for both caches; ``--rows-launch BN,W,S;...`` the default (rows) kernel and ``--keys-launch
BN,W,S;...`` the keys-major one at each launch (stages 0: Triton's default).

``--exact R,W,S[,KB[,KEYS[,TR,TW]]];...`` (GPU): also time the exact mode's attention kernel
(r1mega/ops/triton_exact_attention.py) on the bf16 cache through its slot table, at its default
launch and at each ``rows,warps,stages[,key block[,keys-major 0/1[,training rows,warps]]]``
given (stages 0: Triton's default): each checked bit for bit against the default (the exact mode
may only use launches that change no bit), with the training tiles' time on 8 x 2,048 packed
tokens (the kernel's training tiles, or TR,TW) and whether a query decoded alone gets its
training bits under that launch.

``--smoke``: a tiny shape on the CPU, where the custom op runs its PyTorch reference.
"""
from __future__ import annotations

import argparse
import functools
import json
import math

import torch


def _tables(ctx: list[int], bs: int, gen: torch.Generator) -> tuple[list[list[int]], int]:
    n_blocks = sum(-(-c // bs) for c in ctx) + 1
    perm = (torch.randperm(n_blocks - 1, generator=gen) + 1).tolist()  # never the scratch block
    tables, i = [], 0
    for c in ctx:
        n = -(-c // bs)
        tables.append(perm[i:i + n])
        i += n
    return tables, n_blocks


def _launch(spec: str) -> tuple[int, int, int]:
    try:
        n, warps, stages = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--rows-launch/--keys-launch {spec!r}: expected BLOCK_N,WARPS,STAGES "
                         f"(e.g. 64,4,3)") from None
    return n, warps, stages


def main(argv=None) -> int:
    from r1mega.bench.timing import copy_bandwidth, graph_ms, median_ms
    from r1mega.bench.train_step import _no_nan
    from r1mega.rollout.attention import attend_decode_gather
    from r1mega.rollout.kv_cache import dequantize_rows, quantize_rows
    from r1mega.rollout import triton_paged  # noqa: F401  (registers the op)

    ap = argparse.ArgumentParser(prog="r1mega bench decode-attention", description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--min-ctx", type=int, default=128)
    ap.add_argument("--max-ctx", type=int, default=384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--block-n", default="", help="GPU: comma list of keys-per-tile sizes to sweep")
    ap.add_argument("--rows-launch", default="", help="GPU: ';'-separated BLOCK_N,WARPS,STAGES "
                    "launches of the default (rows) paged kernel to time (e.g. '64,4,3;128,8,2')")
    ap.add_argument("--keys-launch", default="", help="GPU: ';'-separated BLOCK_N,WARPS,STAGES "
                    "launches of the keys-major paged kernel to time (e.g. '64,4,3;64,8,2')")
    ap.add_argument("--exact", default="", help="GPU: ';'-separated rows,warps,stages launches "
                    "of the exact-mode kernel to time beside its default (e.g. '64,4,2;64,8,3')")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seqs, args.min_ctx, args.max_ctx, args.heads, args.kv_heads, args.head_dim = 4, 3, 40, 4, 2, 16
        args.block_tokens, args.reps = 4, 3
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, d, bs = args.seqs, args.heads, args.kv_heads, args.head_dim, args.block_tokens
    ctx = [args.min_ctx + (args.max_ctx - args.min_ctx) * i // max(1, b - 1) for i in range(b)]
    tables, n_blocks = _tables(ctx, bs, gen)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).to(dev)
    ctx_t = torch.tensor(ctx, dtype=torch.int32).to(dev)
    k = torch.randn(n_blocks, bs, hkv, d, generator=gen).to(dev)
    v = torch.randn(n_blocks, bs, hkv, d, generator=gen).to(dev)
    q = torch.randn(b, hq, d, generator=gen).to(dev, dtype)
    scale = 1 / math.sqrt(d)
    k8, ks = quantize_rows(k)
    v8, vs = quantize_rows(v)
    caches = {"bf16" if cuda else "fp32": (k.to(dtype), v.to(dtype), None, None), "fp8": (k8, v8, ks, vs)}
    tokens = sum(ctx)
    meta = q.numel() * q.element_size() * 2 + bt.numel() * 4 + b * 4  # q in, out, tables, lengths
    bw = copy_bandwidth(1 << 30, 10) if cuda else float("nan")

    def timed_ms(fn) -> float:
        # on the GPU a CUDA graph of 20 calls (the rollout replays decode steps from graphs; the
        # host's launch time, often longer than one of these kernels, stays out)
        return graph_ms(fn, 20) if cuda else median_ms(fn, args.reps, 3, False)

    def read_bytes(name: str) -> int:
        elem = 1 if name == "fp8" else torch.empty((), dtype=dtype).element_size()
        return 2 * tokens * hkv * (d * elem + (4 if name == "fp8" else 0)) + meta

    rows = {}
    for name, (kc, vc, sk, sv) in caches.items():
        def call(kc=kc, vc=vc, sk=sk, sv=sv):
            return torch.ops.r1mega.paged_decode_attention(q, kc, vc, bt, ctx_t, scale, sk, sv)

        ms = timed_ms(call)
        rows[name] = {"us": ms * 1e3, "bytes": read_bytes(name),
                      "bytes_floor_fraction": read_bytes(name) / bw / (ms * 1e-3)}
    variants = {}  # row -> its output, for the error against float64 below
    if cuda:
        # Both kernels explicitly (whatever R1MEGA_PAGED_DECODE chose for the op above), and the
        # FP8 cache's fp16 dots (f16_dots) beside its default (dots in q's dtype).
        from r1mega.rollout.triton_paged import paged_decode_attention as pda

        for name, cache, kw in (("bf16-rows", "bf16", {"keys_major": False, "heads_inner": False}),
                                ("bf16-rows-heads", "bf16", {"keys_major": False, "heads_inner": True}),
                                ("bf16-keys", "bf16", {"keys_major": True}),
                                ("fp8-rows", "fp8", {"keys_major": False, "f16_dots": False}),
                                ("fp8-rows-f16dots", "fp8", {"keys_major": False, "f16_dots": True}),
                                ("fp8-keys", "fp8", {"keys_major": True, "f16_dots": False}),
                                ("fp8-keys-f16dots", "fp8", {"keys_major": True, "f16_dots": True}),
                                ("fp8-rows-f8dots", "fp8", {"keys_major": False, "f8_dots": True}),
                                ("fp8-keys-f8dots", "fp8", {"keys_major": True, "f8_dots": True})):
            kc, vc, sk, sv = caches[cache]

            def call(kc=kc, vc=vc, sk=sk, sv=sv, kw=kw):
                return pda(q, kc, vc, bt, ctx_t, scale, k_scale=sk, v_scale=sv, **kw)

            ms = timed_ms(call)
            rows[name] = {"us": ms * 1e3, "bytes": read_bytes(cache),
                          "bytes_floor_fraction": read_bytes(cache) / bw / (ms * 1e-3)}
            variants[name] = (cache, call().double())
        # the CUDA kernels (R1MEGA_PAGED_FP8=cuda: CUDA cores, =mma: tensor cores), where the
        # extension loads
        from r1mega.rollout import cuda_paged

        if cuda_paged.get() is not None and cuda_paged.why_not(q, k8, ks) is None:
            calls = {name: functools.partial(cuda_paged.paged_decode_fp8_cuda, tensor_cores=tc,
                                             heads_inner=inner, warps_per_head=w)
                     for name, tc, inner, w in (("fp8-cuda", False, False, 4), ("fp8-mma", True, False, 4),
                                                ("fp8-mma-heads", True, True, 4),
                                                ("fp8-mma-w2", True, False, 2),
                                                ("fp8-mma-w1", True, False, 1))}
            if cuda_paged.rows_why_not(q, k8, ks) is None:
                # one CTA a sequence (R1MEGA_PAGED_GRID=seq), and the same writing o_proj's rows
                calls["fp8-mma-seq"] = functools.partial(cuda_paged.paged_decode_fp8_cuda,
                                                         tensor_cores=True, seq_cta=True)
                calls["fp8-mma-seq+rows"] = lambda *a: cuda_paged.paged_decode_fp8_rows(*a, cluster=False)[0]
            # what the FP8 rollout's o_proj needs: the attention and its rows in e4m3, by the
            # one-pass row kernel after it, or by the kernel itself through a cluster
            from r1mega.precision import triton_fp8_rows

            def mma_then_rows(*a):
                out = cuda_paged.paged_decode_fp8_cuda(*a, tensor_cores=True)
                triton_fp8_rows.fp8_rows(out.reshape(out.shape[0], -1), True)
                return out

            calls["fp8-mma+row-kernel"] = mma_then_rows
            if cuda_paged.rows_cluster_why_not(q, k8, ks) is None:
                calls["fp8-mma+cluster-rows"] = lambda *a: cuda_paged.paged_decode_fp8_rows(*a, cluster=True)[0]
            for name, fn in calls.items():
                def call_cuda(fn=fn):
                    return fn(q, k8, v8, bt, ctx_t, scale, ks, vs)

                ms = timed_ms(call_cuda)
                rows[name] = {"us": ms * 1e3, "bytes": read_bytes("fp8"),
                              "bytes_floor_fraction": read_bytes("fp8") / bw / (ms * 1e-3)}
                variants[name] = ("fp8", call_cuda().double())
            for name, fn in _rope_calls(q, k8, v8, ks, vs, bt, ctx_t, scale, gen).items():
                ms = timed_ms(fn)
                rows[name] = {"us": ms * 1e3, "bytes": read_bytes("fp8"),
                              "bytes_floor_fraction": read_bytes("fp8") / bw / (ms * 1e-3)}
        else:
            print(f"fp8-cuda, fp8-mma: not timed ({cuda_paged.load_error() or cuda_paged.why_not(q, k8, ks)})")
    sweep = {}
    if cuda and (args.block_n or args.keys_launch or args.rows_launch):
        from r1mega.rollout.triton_paged import paged_decode_attention

        launches = [(int(x), None, None, False) for x in args.block_n.split(",") if x]
        launches += [(*_launch(spec), False) for spec in args.rows_launch.split(";") if spec]
        launches += [(*_launch(spec), True) for spec in args.keys_launch.split(";") if spec]
        for n, warps, stages, keys in launches:
            for name, (kc, vc, sk, sv) in caches.items():
                ms = timed_ms(lambda n=n, kc=kc, vc=vc, sk=sk, sv=sv, w=warps, st=stages, kz=keys:
                              paged_decode_attention(q, kc, vc, bt, ctx_t, scale, k_scale=sk,
                                                     v_scale=sv, block_n=n, keys_major=kz,
                                                     num_warps=w or 4, num_stages=st or None))
                label = f"{n}" if warps is None else f"{'keys' if keys else 'rows'} {n},{warps},{stages}"
                sweep[f"{name}@{label}"] = ms * 1e3
    exact = _time_exact(q, caches[next(iter(caches))], bt, ctx_t, scale, args) if cuda and args.exact else {}
    # Accuracy of the FP8 kernel: against float64 on its own (dequantised) K/V, and on the
    # unquantised K/V it stands in for.
    out = torch.ops.r1mega.paged_decode_attention(q, k8, v8, bt, ctx_t, scale, ks, vs).double()
    ref_deq = attend_decode_gather(q.double(), dequantize_rows(k8, ks, torch.float64),
                                   dequantize_rows(v8, vs, torch.float64), bt, ctx_t, scale)
    ref = attend_decode_gather(q.double(), k.double(), v.double(), bt, ctx_t, scale)
    rows["fp8"].update(max_err_vs_dequantised=float((out - ref_deq).abs().max()),
                       max_err_vs_unquantised=float((out - ref).abs().max()),
                       mean_err_vs_unquantised=float((out - ref).abs().mean()))
    rows["fp8"]["mean_err_vs_dequantised"] = float((out - ref_deq).abs().mean())
    ref_bf16 = attend_decode_gather(q.double(), k.to(dtype).double(), v.to(dtype).double(), bt, ctx_t, scale)
    for name, (cache, o) in variants.items():
        r = ref_deq if cache == "fp8" else ref_bf16
        rows[name].update(max_err_vs_reference=float((o - r).abs().max()),
                          mean_err_vs_reference=float((o - r).abs().mean()))
    # Peer: SDPA over a contiguous cache padded to the longest context (masked).
    kd = torch.randn(b, hkv, max(ctx), d, generator=gen).to(dev, dtype)
    vd = torch.randn(b, hkv, max(ctx), d, generator=gen).to(dev, dtype)
    mask = (torch.arange(max(ctx), device=dev)[None, :] < ctx_t[:, None].long())[:, None, None, :]
    peer_ms = timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], kd, vd, attn_mask=mask, scale=scale, enable_gqa=True))
    base = next(iter(rows))
    ratio = rows[base]["us"] / rows["fp8"]["us"]

    print(f"decode attention: {b} sequences, contexts {args.min_ctx}..{args.max_ctx}, {hq} q / {hkv} kv "
          f"heads x {d}, {bs}-token blocks, device copy {bw / 1e12:.2f} TB/s")
    print(f"{'kernel':<18}{'us/call':>10}{'MB read':>10}{'bytes floor':>13}")
    for name, r in rows.items():
        print(f"{name:<18}{r['us']:>10.1f}{r['bytes'] / 1e6:>10.1f}{r['bytes_floor_fraction']:>13.1%}")
    for key, us in sweep.items():
        print(f"{key:<18}{us:>10.1f}   (launch sweep)")
    for key, r in exact.items():
        print(f"exact {key:<12}{r['us']:>8.1f} us  bits {'= default' if r['bit_equal'] else 'differ'}"
              f"  training 8x2048: {r.get('train_us', float('nan')):.0f} us"
              f"  decode = training: {r.get('decode_equals_training', '-')}  {r.get('error', '')}")
    print(f"{'SDPA':<18}{peer_ms * 1e3:>10.1f}   (contiguous {str(dtype).replace('torch.', '')} cache, padded)")
    for name in variants:
        print(f"{name:<18} vs float64 on its cache's values, max / mean |err|: "
              f"{rows[name]['max_err_vs_reference']:.2e} / {rows[name]['mean_err_vs_reference']:.2e}")
    f = rows["fp8"]
    print(f"{base} / fp8 time = {ratio:.2f}x; fp8 max |err| vs float64 on its dequantised K/V "
          f"{f['max_err_vs_dequantised']:.2e}, vs the unquantised K/V {f['max_err_vs_unquantised']:.2e} "
          f"(mean {f['mean_err_vs_unquantised']:.2e})")
    print(json.dumps(_no_nan({"bench": "decode-attention", "device": str(dev), "smoke": args.smoke,
                              "seqs": b, "context_tokens": tokens, "rows": rows,
                              "sdpa_peer_us": peer_ms * 1e3, "fp8_speedup": ratio, "block_n_us": sweep, "exact": exact,
                              "copy_bandwidth_Bps": bw})))
    return 0


def _rope_calls(q, k8, v8, ks, vs, bt, ctx_t, scale, gen) -> dict:
    """What the decode step runs from linear_qkv's output to attention's: the RoPE kernel
    (r1mega/rollout/triton_rope_kv.py) then the tensor-core kernel (``fp8-rope-kernel+mma``), and
    both in one (``fp8-mma-rope``, ``R1MEGA_PAGED_FP8_ROPE``), on copies of the cache (each call
    writes every sequence's new row at its last position)."""
    from r1mega.rollout import cuda_paged, cuda_paged_rope, triton_rope_kv

    b, hq, d = q.shape
    hkv, bs = k8.shape[2], k8.shape[1]
    qkv = torch.randn(b, hkv, (hq // hkv + 2) * d, generator=gen).to(q.device, q.dtype)
    pos = ctx_t.long() - 1
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=q.device).float() / d))
    freqs = torch.cat([torch.outer(pos.float(), inv)] * 2, -1)
    cos, sin = freqs.cos().to(q.dtype), freqs.sin().to(q.dtype)
    slots = bt.long()[torch.arange(b, device=q.device), pos // bs] * bs + pos % bs
    row_scale = 2.0 ** torch.randint(-2, 3, (b,), generator=gen).float().to(q.device)
    kc, vc, sk, sv = k8.clone(), v8.clone(), ks.clone(), vs.clone()
    calls = {}
    if cuda_paged_rope.why_not(qkv, kc, sk) is None:
        def unfused():
            qr = triton_rope_kv.rope_kv_write_triton(qkv[:, None], cos[:, None, None], sin[:, None, None], slots,
                                                     kc, vc, k_scale=sk, v_scale=sv, row_scale=row_scale)
            return cuda_paged.paged_decode_fp8_cuda(qr, kc, vc, bt, ctx_t, scale, sk, sv, tensor_cores=True)

        calls["fp8-rope-kernel+mma"] = unfused
        calls["fp8-mma-rope"] = lambda: cuda_paged_rope.paged_decode_fp8_rope(
            qkv, cos, sin, slots, row_scale, kc, vc, sk, sv, bt, ctx_t, scale)[0]
    return calls


def _time_exact(q, cache, bt, ctx_t, scale, args) -> dict:
    """The exact-mode kernel at its default launch and each ``--exact`` one: decode us per call,
    whether the output has the default's bits, the training tiles' us on 8 x 2,048 packed tokens
    under the same launch, and whether a query decoded alone gets its training bits."""
    from r1mega.bench.timing import graph_ms
    from r1mega.ops import triton_exact_attention as tea

    kc, vc = cache[0], cache[1]
    hkv, d, bs = kc.shape[-2], kc.shape[-1], kc.shape[1]
    j = torch.arange(bt.shape[1] * bs, device=q.device)
    slots = bt.long().gather(1, (j // bs)[None, :].expand(bt.shape[0], -1)) * bs + j % bs
    q_seq = torch.arange(q.shape[0], device=q.device)
    q_pos = ctx_t.long() - 1
    tiles = tea.tile_sizes(q_seq, tea.queries_per_tile(q.shape[1], hkv))
    kf, vf = kc.view(-1, hkv, d), vc.view(-1, hkv, d)

    # a training micro-batch's packed rows (8 x 2,048) through the training tiles, to see what a
    # launch (or key block) costs the training forward
    t = 8 * 2048
    gen = torch.Generator(device=q.device).manual_seed(1)
    tq = torch.randn(t, q.shape[1], d, device=q.device, dtype=q.dtype, generator=gen)
    tk, tv = (torch.randn(t, hkv, d, device=q.device, dtype=q.dtype, generator=gen) for _ in range(2))
    tslots, tseq, tpos = tea.packed_tables([2048] * 8, 2048 + 128, q.device)

    def run(config=None):
        return tea.exact_attention_slots(q, kf, vf, slots, q_seq, q_pos, scale, tiles=tiles,
                                         _config=config)

    def train(config=None):
        return tea.exact_attention_slots(tq, tk, tv, tslots, tseq, tpos, scale, _config=config)

    ref = run()
    base_train = (tea.TRAIN_TILE_ROWS, tea.TRAIN_WARPS)
    out = {}
    for spec in ["default"] + list(filter(None, args.exact.split(";"))):
        config = None if spec == "default" else tuple(int(x) for x in spec.split(","))
        try:
            row = {"us": graph_ms(lambda c=config: run(c), 20) * 1e3,
                   "bit_equal": bool(torch.equal(run(config), ref))}
            # the training tiles under the same key block: their cost, and the decoded query
            # against training (the exact mode's invariant)
            keys = bool(config[4]) if config and len(config) > 4 else tea.KEYS_MAJOR
            train_tiles = config[5:7] if config and len(config) > 6 else tea.TRAIN_TILES["keys" if keys else "rows"]
            tc = (tuple(train_tiles) + config[2:5]) if config else base_train
            row["train_us"] = graph_ms(lambda: train(tc), 3) * 1e3
            one = train(tc)[tpos == 777]  # the query at position 777 of each sequence
            n8 = torch.arange(8, device=q.device)
            alone = tea.exact_attention_slots(tq[tpos == 777], tk, tv, tslots[:, :778 + 128].contiguous(),
                                              n8, torch.full_like(n8, 777), scale, _config=config)
            row["decode_equals_training"] = bool(torch.equal(alone, one))
            out[spec] = row
        except Exception as e:  # a launch the device cannot compile (shared memory): say so
            out[spec] = {"us": float("nan"), "bit_equal": False, "error": str(e)[:200]}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
