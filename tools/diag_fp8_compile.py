"""Diagnostic: the FP8 rollout's compiled decode (CUDA graphs) for one recipe on a tiny model,
printing the compile failure's full traceback (the engine itself only warns and runs eagerly).
  python3 tools/diag_fp8_compile.py blockwise [rowwise ...]"""
import os
import sys
import traceback

import torch


def main() -> int:
    from r1mega.config import ModelConfig, ParallelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.precision.policy import resolve_rollout_fp8_policy
    from r1mega.precision.rollout import Fp8RolloutWeights
    import r1mega.rollout.engine as engine_mod
    from r1mega.rollout.types import GenerationRequest

    base = engine_mod.DecodeGraphs

    class Loud(base):
        def capture(self, *a, **k):
            try:
                return super().capture(*a, **k)
            except Exception:
                traceback.print_exc()
                raise

    engine_mod.DecodeGraphs = Loud
    rt = init_parallel(ParallelConfig(), PrecisionConfig())  # one process
    rc = 0
    for recipe in sys.argv[1:] or ["blockwise"]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                        num_query_groups=2, ffn_hidden_size=512, vocab_size=1000,
                                        max_position_embeddings=256), rt, wrap=False)
        policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe=recipe), "cuda")
        fp8 = Fp8RolloutWeights(model[0], policy)
        cfg = RolloutConfig(max_new_tokens=8, kv_block_tokens=16, max_batch_sequences=64,
                            temperature=0.0, compile_decode=True, cuda_graphs=True)
        eng = engine_mod.RolloutEngine(model, cfg, rt, eos_ids=[], vocab_size=1000)
        prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
        with fp8.decoding():
            eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(prompts)])
        held = eng._compiled_decode != eng._decode_logits
        print(f"==== {recipe} R1MEGA_FP8_GRAPH={os.environ.get('R1MEGA_FP8_GRAPH', '1')}: "
              f"compile {'held' if held else 'FELL BACK'}", flush=True)
        rc |= 0 if held else 1
        eng.release()
        fp8.remove()
    return rc


if __name__ == "__main__":
    sys.exit(main())
