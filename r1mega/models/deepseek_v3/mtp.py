"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules after the main model.

Module k (1..D) sees, at position i, the previous depth's hidden state h^{k-1}_i (h^0: the main
model's output after its final norm, as megatron and vLLM feed it) and the embedding of token
t_{i+k}:

    h'^k_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]       (eh_proj: 2H -> H)
    h^k    = TRM_k(h'^k)                                            (one decoder layer, MLA)
    logits^k_i = OutHead(RMSNorm(h^k_i))  predicts t_{i+k+1}        (the model's shared head)

The loss (:func:`mtp_loss_sum`) is lambda/D * sum_k CE_k over the tokens the main loss trains,
shifted by k inside each packed sequence. Rollout and log-prob passes never run the modules: they
compute only when the train step asks for them (``MTPHeads.active``), so GRPO and generation see
the plain causal LM.

Wiring: :func:`attach_mtp` hangs the modules on the GPTModel (so DDP, the optimizer and
checkpoints see their parameters) and, through forward hooks, captures the model's inputs and its
decoder output; the logits of every depth wait in ``MTPHeads.take()`` for the loss.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.spec_utils import build_module

from r1mega.models.attention import packed_seq_ids
from r1mega.models.spec import RMSNorm


def shift_in_sequences(x: torch.Tensor, k: int, seq_ids: torch.Tensor, fill=0):
    """x (T, ...) -> (x[i+k] where token i+k is in i's sequence, else ``fill``; valid (T,) bool).

    Tokens are packed sequences end to end; ``seq_ids`` (T,) names each token's sequence."""
    t = x.shape[0]
    shifted = torch.full_like(x, fill)
    valid = torch.zeros(t, dtype=torch.bool, device=x.device)
    if k < t:
        shifted[: t - k] = x[k:]
        valid[: t - k] = seq_ids[k:] == seq_ids[: t - k]
    shifted[~valid] = fill
    return shifted, valid


def token_seq_ids(num_tokens: int, packed_seq_params, seq_len: int, device) -> torch.Tensor:
    """(T,) sequence index of each token, tokens in (B, S) order (packed THD: from cu_seqlens;
    a (B, S) batch of equal lengths: token t = b*S + s belongs to sequence b)."""
    if packed_seq_params is not None:
        return packed_seq_ids(packed_seq_params.cu_seqlens_q, num_tokens)
    return torch.arange(num_tokens, device=device) // seq_len


class MTPModule(torch.nn.Module):
    """One depth: the two norms, the projection, a decoder layer and the final norm."""

    def __init__(self, config, layer_spec, layer_number: int, pg_collection):
        super().__init__()
        h = config.hidden_size
        self.enorm = RMSNorm(config, h, eps=config.layernorm_epsilon)
        self.hnorm = RMSNorm(config, h, eps=config.layernorm_epsilon)
        # Replicated over TP ranks: its input is the same on every rank, so are its gradients.
        self.eh_proj = torch.nn.Linear(2 * h, h, bias=False, dtype=config.params_dtype,
                                       device="cpu" if config.use_cpu_initialization else "cuda")
        torch.nn.init.normal_(self.eh_proj.weight, std=config.init_method_std)
        self.layer = build_module(layer_spec, config=config, layer_number=layer_number,
                                  pg_collection=pg_collection)
        self.final_norm = RMSNorm(config, h, eps=config.layernorm_epsilon)

    def forward(self, hidden, embedded, packed_seq_params):
        """hidden, embedded (S, B, H) -> (h^k (S, B, H), normed for the head (S, B, H))."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        x, _ = self.layer(x, attention_mask=None, packed_seq_params=packed_seq_params)
        return x, self.final_norm(x)


class MTPHeads(torch.nn.Module):
    """The D modules of one model and what the forward hooks captured for them."""

    def __init__(self, config, layer_specs: list, num_layers: int, pg_collection):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            MTPModule(config, spec, num_layers + k + 1, pg_collection) for k, spec in enumerate(layer_specs))
        self.active = False  # set by the train step for losses that use MTP
        self._inputs = None
        self._hidden = None
        self._logits: Optional[list] = None

    def take(self) -> Optional[list]:
        """The per-depth logits of the last active forward ((T, V/tp) each), once."""
        out, self._logits = self._logits, None
        return out

    def run(self, gpt) -> list:
        """Per-depth logits (T, V/tp), tokens in the order of ``input_ids`` (B, S) flattened,
        which is the packed order the loss reads (sequences end to end)."""
        input_ids, packed = self._inputs                                # (B, S); packed: (1, T)
        hidden = self._hidden                                           # (S, B, H)
        b, s = input_ids.shape
        ids = input_ids.reshape(-1)                                     # (T,) = b*S + s
        seq = token_seq_ids(ids.numel(), packed, s, ids.device)
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        out = []
        for k, module in enumerate(self.layers, start=1):
            shifted, _ = shift_in_sequences(ids, k, seq)                # t_{i+k}
            emb = gpt.embedding(input_ids=shifted.view(b, s), position_ids=None)  # (S, B, H)
            hidden, normed = module(hidden, emb, packed)
            logits, _ = gpt.output_layer(normed, weight=weight)         # (S, B, V/tp)
            out.append(logits.transpose(0, 1).reshape(b * s, -1))
        return out


def attach_mtp(gpt, config, layer_specs: list, num_layers: int, pg_collection) -> MTPHeads:
    """Hang :class:`MTPHeads` on ``gpt`` (last pipeline stage, which holds the head) as
    ``gpt.mtp_heads``; the hooks fill it during ``gpt``'s forward."""
    heads = MTPHeads(config, layer_specs, num_layers, pg_collection)
    # Not ``gpt.mtp``: megatron's schedules treat that attribute as its own MTP block.
    gpt.mtp_heads = heads

    def capture_inputs(module, args, kwargs):
        if heads.active:
            ids = kwargs.get("input_ids", args[0] if args else None)
            heads._inputs = (ids, kwargs.get("packed_seq_params"))

    def capture_hidden(module, args, output):
        if heads.active:
            heads._hidden = output[0] if isinstance(output, tuple) else output

    def run_heads(module, args, kwargs, output):
        if heads.active and heads._hidden is not None:
            heads._logits = heads.run(gpt)
            heads._inputs = heads._hidden = None
        return output

    gpt.register_forward_pre_hook(capture_inputs, with_kwargs=True)
    gpt.decoder.register_forward_hook(capture_hidden)
    gpt.register_forward_hook(run_heads, with_kwargs=True)
    return heads


def mtp_loss_sum(mtp_logits: list, labels: torch.Tensor, loss_mask: torch.Tensor, seq_ids: torch.Tensor,
                 weight: float, target_logprobs) -> torch.Tensor:
    """lambda/D * sum_k (masked NLL sum of depth k). labels/loss_mask (T,): the main loss's (token
    i predicts labels[i] = t_{i+1}); depth k at i predicts labels[i+k] = t_{i+k+1} where i+k is in
    i's sequence and trained. Normalised, like the main loss, by the main token count (the depths
    train the same tokens less k per sequence end). ``target_logprobs(logits, labels) -> (T,)``."""
    total = torch.zeros((), dtype=torch.float32, device=labels.device)
    for k, logits in enumerate(mtp_logits, start=1):
        target, valid = shift_in_sequences(labels, k, seq_ids)
        mask, _ = shift_in_sequences(loss_mask.float(), k, seq_ids)
        mask = mask * valid
        logp = target_logprobs(logits, target * (mask > 0))                 # (T,)
        total = total - (logp * mask).sum()
    return total * (weight / len(mtp_logits))
