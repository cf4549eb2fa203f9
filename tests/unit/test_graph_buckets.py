"""Which CUDA-graph bucket a decode batch replays (the capture policy, host logic only)."""
import torch

from r1mega.rollout.cuda_graphs import DecodeGraphs, default_buckets


def _graphs(max_batch=256):
    g = DecodeGraphs(lambda ints, temp: None, max_batch, 4, torch.device("cpu"))
    assert g.buckets == default_buckets(max_batch)
    return g


def test_first_batch_takes_the_smallest_fitting_bucket():
    g = _graphs()
    assert g.bucket_for(64) == 64
    assert g.bucket_for(65) == 96
    assert g.bucket_for(3) == 4


def test_shrinking_batch_keeps_its_graph_until_half_empty():
    g = _graphs()
    g.graphs[64] = object()  # captured for the phase's first batch of 64
    assert [g.bucket_for(n) for n in (64, 40, 32)] == [64, 64, 64]
    assert g.bucket_for(31) == 32  # more than half padding: a smaller graph pays
    g.graphs[32] = object()
    # below MIN_SHRINK rows every batch counts as 16: the 32-row graph serves them all
    assert [g.bucket_for(n) for n in (16, 9, 1)] == [32, 32, 32]
    assert g.bucket_for(33) == 64  # a growing batch (late joiners) goes back up


def test_batches_over_the_largest_bucket_are_refused():
    g = _graphs(64)
    try:
        g.bucket_for(65)
    except ValueError as exc:
        assert "exceeds" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_buckets_of_64_rows_and_more_split_in_two_aligned_halves():
    g = DecodeGraphs(lambda ints, temp: None, 256, 4, torch.device("cpu"), streams=2)
    assert [g.split_at(b) for b in (1, 32, 48, 64, 96, 200, 256)] == [1, 32, 48, 32, 48, 104, 128]
    assert _graphs().split_at(256) == 256  # one stream: never split


def test_two_halves_give_the_one_call_rows():
    """On CPU the halves run one after the other through the same packed-input path; each
    call sees only its own rows and the output is the rows in order."""
    from r1mega.rollout.cuda_graphs import BT, IDS, POS

    calls = []

    def step(ints, temp):
        calls.append(ints.shape[0])
        return torch.stack([ints[:, IDS].double() * 3 + temp.double(), ints[:, POS].double()], dim=1)

    outs = {}
    for streams in (1, 2):
        g = DecodeGraphs(step, 256, 4, torch.device("cpu"), streams=streams)
        n, w = 150, BT + 4
        host = g.host_rows(0, n, w)
        host.copy_(torch.arange(n * w).view(n, w))
        g.host_temp_slots[0][:n] = torch.linspace(0.0, 1.0, n)
        outs[streams] = g.run(n, w)
    assert calls == [160, 80, 80]  # bucket 160 whole, then its halves
    assert torch.equal(outs[1], outs[2]) and outs[2].shape == (150, 2)


def test_decode_streams_refused_where_halves_cannot_run_side_by_side(monkeypatch):
    import pytest

    from r1mega.config import RolloutConfig
    from r1mega.precision import triton_skinny_gemm
    from r1mega.rollout.cuda_graphs import decode_streams

    class Runner:
        tp_size = 1

    assert decode_streams(RolloutConfig(), Runner()) == 1
    assert decode_streams(RolloutConfig(decode_streams=2), Runner()) == 2
    with pytest.raises(ValueError, match="1 or 2"):
        decode_streams(RolloutConfig(decode_streams=3), Runner())
    with pytest.raises(ValueError, match="exact"):
        decode_streams(RolloutConfig(decode_streams=2, exact=True), Runner())
    tp = Runner()
    tp.tp_size = 2
    with pytest.raises(ValueError, match="NCCL"):
        decode_streams(RolloutConfig(decode_streams=2), tp)
    assert decode_streams(RolloutConfig(decode_streams=1), tp) == 1
    monkeypatch.setattr(triton_skinny_gemm, "ENABLED", True)
    with pytest.raises(ValueError, match="R1MEGA_FP8_SKINNY"):
        decode_streams(RolloutConfig(decode_streams=2), Runner())
    with pytest.raises(ValueError, match="1 or 2"):
        DecodeGraphs(lambda i, t: None, 64, 4, torch.device("cpu"), streams=4)
