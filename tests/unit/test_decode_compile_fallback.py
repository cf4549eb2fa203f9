"""The rollout's compiled decode step: when inductor fails on it, the engine compiles it once more
without inductor's memory-coalescing analysis (torch 2.11 asserts there on the blockwise FP8
rollout's quantiser), and only then decodes eagerly with a warning. The control flow is checked
here with a stand-in compiler; tests/gpu/test_fp8_gpu.py checks that the real blockwise decode
compiles."""
import warnings
from types import SimpleNamespace

import pytest
import torch

import r1mega.rollout.engine as engine_mod


class _Graphs:
    """DecodeGraphs' interface: capture runs the step function once (as graph capture does)."""

    def __init__(self, step_fn, max_rows, max_blocks, device):
        self.step_fn = step_fn

    def bucket_for(self, n):
        return n

    def capture(self, buckets):
        self.out = self.step_fn()


class _Engine:
    _capture_graphs = engine_mod.RolloutEngine._capture_graphs

    def __init__(self, compiled: bool):
        self.cfg = SimpleNamespace(max_batch_sequences=4)
        self.device = torch.device("cpu")
        self._compiled_decode = self._decode_logits
        if compiled:
            self._compiled_decode = _compile(self._decode_logits, dynamic=True)

    def max_blocks_per_seq(self):
        return 1

    def _decode_logits(self):
        return "eager"

    def _graph_step(self):
        return self._compiled_decode()


_FAIL = {}  # options key -> error the "compiled" function raises
_SEEN = []


def _compile(fn, dynamic=False, options=None):
    key = tuple(sorted((options or {}).items()))
    _SEEN.append(dict(options or {}))

    def run():
        if key in _FAIL:
            raise _FAIL[key]
        return "compiled"
    return run


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(engine_mod, "DecodeGraphs", _Graphs)
    monkeypatch.setattr(torch, "compile", _compile)
    _FAIL.clear()
    _SEEN.clear()
    yield


NO_COALESCE = (("triton.coalesce_tiling_analysis", False),)


def test_a_compile_that_holds_is_kept(stand_in):
    eng = _Engine(compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng._capture_graphs(2)
    assert eng.graphs.out == "compiled" and _SEEN == [{}]


def test_an_inductor_failure_is_compiled_again_without_the_coalescing_analysis(stand_in):
    _FAIL[()] = AssertionError("tiling_utils")
    eng = _Engine(compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the retry that holds warns nothing
        eng._capture_graphs(2)
    assert eng.graphs.out == "compiled"
    assert _SEEN == [{}, {"triton.coalesce_tiling_analysis": False}]


def test_two_failures_decode_eagerly_and_name_both(stand_in):
    _FAIL[()] = AssertionError("first failure")
    _FAIL[NO_COALESCE] = RuntimeError("second failure")
    eng = _Engine(compiled=True)
    with pytest.warns(UserWarning, match="first failure.*second failure.*continuing eagerly"):
        eng._capture_graphs(2)
    assert eng.graphs.out == "eager" and eng._compiled_decode == eng._decode_logits


class _EagerFails(_Engine):
    def _decode_logits(self):
        raise ValueError("bad")


def test_an_eager_capture_failure_is_raised(stand_in):
    eng = _EagerFails(compiled=False)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="bad"):
        warnings.simplefilter("error")  # raised as it is, not as a "compile failed" warning
        eng._capture_graphs(2)
