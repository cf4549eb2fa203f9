"""rollout.exact with tensor parallelism (2 CPU ranks, gloo): each rank's rollout log-probs equal
the TP=2 training forward's bit for bit, with sequence parallelism in training on and off (the
rollout turns it off; a sum of two partials has one order, so the reductions agree)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks

VOCAB = 100  # padded to 128 over 2 ranks: padding columns are excluded on both sides
PROMPTS = [[5, 17, 3], list(range(20, 37)), [9], [(7 * i) % VOCAB for i in range(21)]]


def _exact_gap(rank, world_size):
    from r1mega.config import ModelConfig, ParallelConfig, RolloutConfig
    from r1mega.models.attention import make_packed_seqs
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest
    from r1mega.train.grpo import exact_shard_logprobs

    rt = init_parallel(ParallelConfig(tensor=2, seed=3))
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=VOCAB, qk_norm=True, max_position_embeddings=128,
                      spec="local")
    gaps = {}
    for sp in (False, True):
        rt.sequence_parallel = sp
        torch.manual_seed(0)
        model = build_model(cfg, rt, wrap=False)
        with torch.no_grad():
            for p in model[0].parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        rcfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=2048, max_new_tokens=7,
                             cuda_graphs=False, compile_decode=False, exact=True)
        eng = RolloutEngine(model, rcfg, rt, eos_ids=[], vocab_size=VOCAB)
        outs = eng.generate([GenerationRequest(p, n=2, seed=9) for p in PROMPTS])
        seqs = [PROMPTS[c.prompt_index] + c.token_ids for c in outs]
        lengths = [len(s) for s in seqs]
        pad = (-sum(lengths)) % 2  # sequence parallelism splits the packed tokens over 2 ranks
        lengths[-1] += pad
        ids = torch.tensor([sum(seqs, []) + [0] * pad])
        with torch.no_grad():
            logits = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                              packed_seq_params=make_packed_seqs(lengths, "cpu"))
        logits = logits.reshape(ids.shape[1], -1)
        worst, start = 0.0, 0
        for c, s in zip(outs, seqs):
            p = len(PROMPTS[c.prompt_index])
            lp = exact_shard_logprobs(logits[start + p - 1:start + len(s) - 1],
                                      torch.tensor(c.token_ids), tp_group=rt.tp_group,
                                      vocab_size=VOCAB, temperature=1.0)
            worst = max(worst, float((lp - torch.tensor(c.logprobs)).abs().max()))
            start += len(s)
        gaps[sp] = worst
        eng.release()
    return gaps


@pytest.mark.slow
def test_exact_tp2_bitwise():
    for gaps in run_ranks(_exact_gap, 2):
        assert gaps == {False: 0.0, True: 0.0}, gaps
