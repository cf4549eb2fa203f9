"""What ``--exact`` adds to `r1mega bench rollout` and `r1mega bench train-step`: the exact mode's
log-prob gap to the training forward, measured the way the trainer sees it.

The completions are packed into training micro-batches (several sequences per forward, in an
order unrelated to how they were decoded), run through the policy's own forward in exact mode
and scored with the trainer's log-prob function; the gap is max |rollout - training| over every
completion token (the bar: exactly 0 over >= 10,000 tokens).
"""
from __future__ import annotations

import torch


def exact_logprob_gap(model, completions, prompts, *, min_tokens: int = 10_000,
                      micro_batch_tokens: int = 4096, temperature: float = 1.0) -> dict:
    """{"max_abs_diff", "tokens", "sequences", "micro_batches"} over the first completions that
    hold ``min_tokens`` completion tokens (all of them if fewer)."""
    from r1mega.models.attention import make_packed_seqs
    from r1mega.ops.exact_logprobs import exact_token_logprobs

    chosen, n_tok = [], 0
    for c in completions:
        if n_tok >= min_tokens:
            break
        chosen.append(c)
        n_tok += len(c.token_ids)
    # Reverse-interleaved order: a sequence's neighbours here are not its decode-batch ones.
    chosen = chosen[1::2][::-1] + chosen[0::2]
    device = next(model[0].parameters()).device
    worst, batches, i = 0.0, 0, 0
    while i < len(chosen):
        group, total = [], 0
        while i < len(chosen) and (not group or total + len(prompts[chosen[i].prompt_index])
                                   + len(chosen[i].token_ids) <= micro_batch_tokens):
            c = chosen[i]
            group.append(c)
            total += len(prompts[c.prompt_index]) + len(c.token_ids)
            i += 1
        seqs = [list(prompts[c.prompt_index]) + list(c.token_ids) for c in group]
        ids = torch.tensor([sum(seqs, [])], device=device)
        with torch.no_grad():
            logits = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                              packed_seq_params=make_packed_seqs([len(s) for s in seqs], device))[0]
        start = 0
        for c, s in zip(group, seqs):
            p = len(prompts[c.prompt_index])
            rows = logits[start + p - 1:start + len(s) - 1]
            tok = torch.tensor(c.token_ids, device=device)
            temp = torch.full((len(tok),), temperature, dtype=torch.float32, device=device)
            lp = exact_token_logprobs(rows, tok, temp)
            roll = torch.tensor(c.logprobs, dtype=torch.float32, device=device)
            worst = max(worst, float((lp - roll).abs().max()))
            start += len(s)
        batches += 1
    return {"max_abs_diff": worst, "tokens": n_tok, "sequences": len(chosen),
            "micro_batches": batches}
