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
