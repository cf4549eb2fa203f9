"""Stop strings cut at the right place; EOS/length finish reasons; bad requests fail clearly."""
from __future__ import annotations

import pytest

from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.types import GenerationRequest
from tests.unit.test_rollout_engine import PROMPTS, VOCAB, rollout_cfg, tiny  # noqa: F401


def decode(ids):
    """Multi-character tokens, so a stop string can start inside one token and end in another."""
    return "".join(f"<{t}>" for t in ids)


def test_stop_string_across_token_boundary(tiny):  # noqa: F811
    model, rt = tiny()
    cfg = rollout_cfg(temperature=1.0, max_new_tokens=10)
    free = RolloutEngine(model, cfg, rt, eos_ids=[], decode_fn=decode, vocab_size=VOCAB)
    toks = free.generate([GenerationRequest(PROMPTS[3], seed=5)])[0].token_ids
    full = decode(toks)
    # A stop string that ends with token i's closing '>' and the '<' + first digit of token i+1,
    # at the first place where that string occurs first in the text.
    for i in range(2, 8):
        stop = f"{toks[i]}><{str(toks[i + 1])[0]}"
        if full.find(stop) == len(decode(toks[:i])) + 1:
            break
    else:
        pytest.fail(f"no usable stop string in sampled tokens {toks}")
    eng = RolloutEngine(model, cfg, rt, eos_ids=[], decode_fn=decode, vocab_size=VOCAB)
    out = eng.generate([GenerationRequest(PROMPTS[3], seed=5, stop=["never-there", stop])])[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == toks[: i + 2]  # the token that completed the stop string is kept
    assert out.text == decode(toks[: i + 1]) + "<" + str(toks[i + 1])[0]  # cut after the stop string
    assert len(out.logprobs) == i + 2


def test_no_stop_hit_runs_to_length_with_full_text(tiny):  # noqa: F811
    model, rt = tiny()
    eng = RolloutEngine(model, rollout_cfg(temperature=0.0, max_new_tokens=7), rt, eos_ids=[],
                        decode_fn=decode, vocab_size=VOCAB)
    out = eng.generate([GenerationRequest(PROMPTS[0], stop=["zzz"])])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert out.text == decode(out.token_ids)


def test_bad_requests_fail_clearly(tiny):  # noqa: F811
    model, rt = tiny()
    eng = RolloutEngine(model, rollout_cfg(), rt, eos_ids=[], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([GenerationRequest([])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([GenerationRequest([1, VOCAB + 3])])
    with pytest.raises(ValueError, match="decode_fn"):
        eng.generate([GenerationRequest([1, 2], stop=["x"])])
    with pytest.raises(ValueError, match="maximum sequence length"):
        eng.generate([GenerationRequest([1] * 128)])
    with pytest.raises(ValueError, match="rollout.max_batch_sequences"):
        eng.generate([GenerationRequest([1, 2], n=65)])


def test_pipeline_parallel_gives_layout_advice(tiny):  # noqa: F811
    model, rt = tiny()

    class TwoStages:
        pp_size = 2

    with pytest.raises(NotImplementedError, match="parallel.pipeline=1"):
        RolloutEngine(model, rollout_cfg(), TwoStages(), eos_ids=[])
