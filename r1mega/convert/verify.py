"""Numerical verification of a conversion against Hugging Face transformers (the reference).

Both models see the same token ids; we report the max |Δlogit| and the mean KL(p_hf || p_ours)
over the real vocabulary (padded columns >= vocab_size are dropped: they do not exist in HF) and
fail above a threshold. Silent conversion bugs (QKV order, gate/up swap, a wrong norm) move the
logits by O(1), orders of magnitude above fp32 round-off, so a loose threshold still catches them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from r1mega.convert.families import ConversionError
from r1mega.convert.hf_bridge import unwrap_chunk

# fp32 on both sides: differences are summation-order round-off (~1e-5 relative).
DEFAULT_MAX_ABS_TOL = 1e-2
DEFAULT_KL_TOL = 1e-4


@dataclass
class VerifyReport:
    max_abs_diff: float
    mean_kl: float
    max_abs_logit: float
    num_tokens: int
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"verify {verdict}: max|Δlogits|={self.max_abs_diff:.3e} mean KL={self.mean_kl:.3e} "
                f"over {self.num_tokens} tokens (max|logit|={self.max_abs_logit:.2f})")


def probe_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """(B, S) token ids drawn reproducibly over the whole vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def compare_logits(ref: torch.Tensor, ours: torch.Tensor, max_abs_tol: float = DEFAULT_MAX_ABS_TOL,
                   kl_tol: float = DEFAULT_KL_TOL) -> VerifyReport:
    """ref, ours: (B, S, V) over the same (unpadded) vocabulary."""
    if ref.shape != ours.shape:
        raise ConversionError(f"logits shapes differ: transformers {list(ref.shape)} vs ours {list(ours.shape)}")
    ref, ours = ref.double(), ours.double()
    max_abs = (ref - ours).abs().max().item()
    logp_ref = F.log_softmax(ref, dim=-1)  # (B, S, V)
    logp_ours = F.log_softmax(ours, dim=-1)  # (B, S, V)
    kl = (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1)  # (B, S)
    mean_kl = kl.mean().item()
    ok = max_abs <= max_abs_tol and mean_kl <= kl_tol
    return VerifyReport(max_abs, mean_kl, ref.abs().max().item(), kl.numel(), ok)


def hf_reference_logits(hf_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, S, V) fp32 logits of transformers' own implementation of the checkpoint in ``hf_dir``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    except Exception as exc:  # the reference cannot even read it: a conversion failure, by name
        raise ConversionError(f"transformers cannot load {hf_dir}: {type(exc).__name__}: "
                              f"{str(exc)[-500:]}") from exc
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def our_logits(model_chunks, input_ids: torch.Tensor, vocab_size: int, ctx) -> torch.Tensor:
    """(B, S, V) logits of our model (TP-gathered, padding dropped). Single pipeline stage only."""
    if ctx.pp_size != 1 or len(model_chunks) != 1:
        raise ConversionError("in-model verification runs one pipeline stage (pp=1, no virtual "
                              "stages); verify a PP layout by converting at pp=1 or pass --no-verify.")
    gpt = unwrap_chunk(model_chunks[0])
    was_training = gpt.training
    gpt.eval()
    ids = input_ids.to(ctx.device)
    pos = torch.arange(ids.shape[1], device=ctx.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = gpt(ids, pos, attention_mask=None)  # (B, S, V_padded/tp)
        if ctx.tp_size > 1:
            pieces = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
            dist.all_gather(pieces, logits.contiguous(), group=ctx.tp_group)
            logits = torch.cat(pieces, dim=-1)  # (B, S, V_padded)
    gpt.train(was_training)
    return logits[..., :vocab_size].float().cpu()


def verify_against_hf(model_chunks, hf_dir: str, model_cfg, ctx, *, batch: int = 2, seq_len: int = 16,
                      max_abs_tol: float = DEFAULT_MAX_ABS_TOL, kl_tol: float = DEFAULT_KL_TOL,
                      raise_on_fail: bool = True) -> VerifyReport:
    """Run transformers on ``hf_dir`` and our chunks on the same tokens; collective over TP."""
    ids = probe_tokens(model_cfg.vocab_size, batch, seq_len)
    ours = our_logits(model_chunks, ids, model_cfg.vocab_size, ctx)
    ref = hf_reference_logits(hf_dir, ids)
    report = compare_logits(ref, ours, max_abs_tol, kl_tol)
    if raise_on_fail and not report.passed:
        raise ConversionError(
            f"{report.line()} exceeds the thresholds (max|Δ| {max_abs_tol:g}, KL {kl_tol:g}): the "
            f"converted model does not compute what transformers computes for {hf_dir}. Nothing "
            f"was written."
        )
    return report
