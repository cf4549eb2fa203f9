import torch
from r1mega.config import ParallelConfig, PrecisionConfig
from r1mega.parallel.launch_env import LaunchEnv
from r1mega.parallel.runtime import init_parallel
from tests.distributed.harness import free_port
from tests.gpu import test_te_gpu as T

for recipe in ("current", "delayed"):
    prec = PrecisionConfig(dtype="bf16", fp8=True, fp8_backend="te", fp8_recipe=recipe)
    if recipe == "current":
        rt = init_parallel(ParallelConfig(), prec, env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    local, te_bf16 = T._pair(rt)
    _, te_fp8 = T._pair(rt, prec)
    print(recipe, "config.fp8", te_bf16.config.fp8, te_fp8.config.fp8, type(te_fp8.decoder.layers[0].self_attention.linear_qkv).__name__)
    sb, sf = te_bf16.state_dict(), te_fp8.state_dict()
    worst = max(((sb[k].float() - sf[k].float()).abs().max().item(), k) for k in sb if torch.is_tensor(sb[k]) and sb[k].is_floating_point() and k in sf)
    print("param diff bf16 vs fp8 model", worst)
    ids = torch.randint(0, 1024, (1, sum(T.LENGTHS)), device="cuda")
    acts = {}
    def hook(name):
        def f(m, i, o):
            o = o[0] if isinstance(o, tuple) else o
            acts.setdefault(name, []).append(o.detach().float())
        return f
    for gpt, tag in ((te_bf16, "b"), (te_fp8, "f")):
        for n, m in gpt.named_modules():
            if n.count(".") <= 4 and ("linear" in n or n.endswith("self_attention") or n.endswith("mlp")):
                m.register_forward_hook(hook(n))
    with torch.no_grad():
        a = T._logits(te_bf16, ids).float(); b = T._logits(te_fp8, ids).float(); b2 = T._logits(te_fp8, ids).float()
    print("rel logits", ((a - b).norm() / a.norm()).item(), "fp8 run-to-run", ((b - b2).norm() / b.norm()).item())
    for n, v in acts.items():
        if len(v) >= 2:
            x, y = v[0], v[1]
            if x.shape == y.shape:
                print(f"  {n:55s} rel {((x - y).norm() / x.norm().clamp(min=1e-9)).item():.3e} |x| {x.abs().max().item():.3e} |y| {y.abs().max().item():.3e}")
    with torch.no_grad():
        one = torch.randint(0, 1024, (1, 384), device="cuda")
        from r1mega.models.attention import make_packed_seqs
        f = lambda g: g(input_ids=one, position_ids=None, attention_mask=None, packed_seq_params=make_packed_seqs([384], "cuda")).float()
        a1, b1 = f(te_bf16), f(te_fp8)
    print("one seq rel", ((a1 - b1).norm() / a1.norm()).item())
