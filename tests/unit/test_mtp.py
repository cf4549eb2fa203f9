"""Multi-token prediction: the packed, batched MTP logits and loss of r1mega's deepseek_v3 model
equal a direct per-sequence reference of DeepSeek-V3's recursion, MTP trains only through the SFT
loss, and log-prob passes never run it."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from r1mega.config import ModelConfig, PrecisionConfig
from r1mega.models.attention import make_packed_seqs
from r1mega.models.deepseek_v3.hf_peer import TINY
from r1mega.models.deepseek_v3.mtp import mtp_loss_sum, shift_in_sequences

VOCAB = TINY["vocab_size"]


def _model(rt, depth=2, **kw):
    from r1mega.models.gpt import build_model

    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(**TINY), spec="local", mtp_num_layers=depth, **kw)
    return cfg, build_model(cfg, rt, PrecisionConfig(dtype="fp32"), wrap=False)[0]


def _decoder_output(gpt, ids):
    """The main model's hidden states after its final norm for one sequence (1, n) -> (n, H)."""
    seen = {}
    h = gpt.decoder.register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    gpt.mtp_heads.active = False
    gpt(ids, None, attention_mask=None)
    h.remove()
    return seen["h"][:, 0]


def _reference(gpt, ids_1d: torch.Tensor, mask_1d: torch.Tensor, weight: float):
    """DeepSeek-V3 §2.2 written out for ONE sequence without padding: depth k sees positions
    0..n-k-1, t_{i+k} embedded, h^{k-1} cut to the same length. Returns (logits per depth, loss)."""
    n = ids_1d.numel()
    h = _decoder_output(gpt, ids_1d.view(1, n))                      # (n, H)
    logits, loss = [], torch.zeros(())
    for k, mod in enumerate(gpt.mtp_heads.layers, start=1):
        m = n - k
        emb = gpt.embedding(input_ids=ids_1d[k:].view(1, m), position_ids=None)[:, 0]    # (m, H)
        x = F.linear(torch.cat([mod.enorm(emb), mod.hnorm(h[:m])], -1), mod.eh_proj.weight)
        x, _ = mod.layer(x.unsqueeze(1), attention_mask=None)        # (m, 1, H), causal
        h = x[:, 0]
        lg = F.linear(mod.final_norm(h), gpt.output_layer.weight)[:, :VOCAB]              # (m, V)
        logits.append(lg)
        # position i predicts t_{i+k+1}, trained where the main loss trains token i+k
        tgt, msk = ids_1d[k + 1:], mask_1d[k:n - 1]
        loss = loss + (F.cross_entropy(lg[: m - 1], tgt, reduction="none") * msk).sum()
    return logits, loss * weight / len(gpt.mtp_heads.layers)


def test_shift_stays_inside_each_sequence():
    x = torch.arange(7)
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    shifted, valid = shift_in_sequences(x, 2, seq, fill=-1)
    assert shifted.tolist() == [2, -1, -1, 5, 6, -1, -1]
    assert valid.tolist() == [True, False, False, True, True, False, False]


@pytest.mark.parametrize("packed", [True, False])
def test_mtp_logits_and_loss_equal_a_per_sequence_reference(rt_fp32, packed):
    cfg, gpt = _model(rt_fp32)
    gpt.eval()
    g = torch.Generator().manual_seed(3)
    lengths = [9, 6, 11] if packed else [8, 8]
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    masks = [torch.cat([torch.zeros(2), torch.ones(n - 3), torch.zeros(1)]) for n in lengths]  # prompt 2
    ids = torch.cat(seqs)
    labels = torch.cat([torch.cat([s[1:], s[:1] * 0]) for s in seqs])
    mask = torch.cat(masks)
    with torch.no_grad():
        gpt.mtp_heads.active = True
        if packed:
            gpt(ids.view(1, -1), None, attention_mask=None, packed_seq_params=make_packed_seqs(lengths, "cpu"))
        else:
            gpt(ids.view(len(lengths), -1), None, attention_mask=None)
        got = gpt.mtp_heads.take()
        assert gpt.mtp_heads.take() is None  # handed over once
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

        def target_logprobs(lg, tgt):
            return torch.log_softmax(lg[:, :VOCAB].float(), -1).gather(-1, tgt[:, None])[:, 0]

        loss = mtp_loss_sum(got, labels, mask, seq_ids, 0.3, target_logprobs)
        want_loss = torch.zeros(())
        start = 0
        for s, m in zip(seqs, masks):
            ref_logits, ref_loss = _reference(gpt, s, m, 0.3)
            want_loss = want_loss + ref_loss
            for k, lg in enumerate(ref_logits):
                torch.testing.assert_close(got[k][start:start + lg.shape[0], :VOCAB], lg, rtol=1e-5, atol=1e-5)
            start += s.numel()
    assert len(got) == 2 and loss > 0
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)


def test_mtp_trains_in_sft_only_and_leaves_the_causal_lm_alone(rt_fp32):
    from r1mega.train.step import sft_loss_fn

    _, plain = _model(rt_fp32, depth=0)
    _, gpt = _model(rt_fp32, depth=1)
    missing, unexpected = gpt.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp_heads.") for k in missing)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # inactive (log-probs, rollout): same logits, nothing run or kept
        assert torch.equal(gpt(ids, None, attention_mask=None), plain(ids, None, attention_mask=None))
        assert gpt.mtp_heads.take() is None
    assert not hasattr(sft_loss_fn(VOCAB), "mtp_loss")
    assert hasattr(sft_loss_fn(VOCAB, mtp_weight=0.1), "mtp_loss")
    # The MTP loss reaches the MTP parameters (and the shared head) through backward.
    gpt.mtp_heads.active = True
    gpt(ids, None, attention_mask=None)
    logits = gpt.mtp_heads.take()
    labels = torch.cat([ids[0, 1:], ids[0, :1]])
    loss = mtp_loss_sum(logits, labels, torch.ones(12), torch.zeros(12, dtype=torch.long), 0.1,
                        lambda lg, t: torch.log_softmax(lg[:, :VOCAB], -1).gather(-1, t[:, None])[:, 0])
    loss.backward()
    assert gpt.mtp_heads.layers[0].eh_proj.weight.grad.abs().sum() > 0
    assert gpt.output_layer.weight.grad.abs().sum() > 0


def test_mtp_config_is_checked():
    from r1mega.config import Config, ConfigError, validate

    cfg = Config()
    cfg.model.mtp_num_layers = 1
    with pytest.raises(ConfigError, match="model.family=deepseek_v3 only"):
        validate(cfg)
    cfg.model = dataclasses.replace(ModelConfig(**TINY), spec="local", mtp_num_layers=1)
    cfg.parallel.pipeline = 3
    with pytest.raises(ConfigError, match="parallel.pipeline=3 is not implemented"):
        validate(cfg, world_size=3)
