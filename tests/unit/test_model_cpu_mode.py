"""CPU mode (r1mega.parallel.cpu_mode): what megatron asks of CUDA is answered on the CPU."""
from __future__ import annotations

import pytest
import torch

from r1mega.parallel import cpu_mode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is off with a GPU")


@pytest.fixture
def cpu():
    was_on = cpu_mode.cpu_mode_enabled()
    assert cpu_mode.enable_cpu_mode() is True
    yield
    if not was_on:
        cpu_mode.disable_cpu_mode()


def test_cuda_device_requests_land_on_cpu(cpu):
    made = [
        torch.empty(3, device="cuda"),
        torch.zeros(2, device=torch.cuda.current_device()),
        torch.ones(2, device=torch.device("cuda", 0)),
        torch.tensor([1, 2], device="cuda:0"),
        torch.ones(2).cuda(),
        torch.ones(2).to("cuda"),
        torch.ones(2).to(device="cuda", dtype=torch.float16),
    ]
    assert all(t.device.type == "cpu" for t in made)
    assert made[-1].dtype == torch.float16


def test_type_queries_answer_like_cuda_but_conversions_still_convert(cpu):
    # megatron's distributed optimizer selects its fp32 / bf16 paths by these strings
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float16).dtype == torch.float16


def test_streams_events_and_sync_are_stand_ins(cpu):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.ones(4) * 2
    s.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    torch.cuda.synchronize()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)
    assert x.sum().item() == 8.0
    assert torch.cuda.is_available() is False  # r1mega itself still knows where it runs


def test_rng_tracker_forks_cpu_states(cpu):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork():
        inside = torch.rand(2)
    after = torch.rand(2)
    torch.manual_seed(123)
    assert torch.equal(inside, torch.rand(2))  # the tracked stream
    assert torch.equal(after, outside)  # the default stream is untouched by the fork


def test_new_tensor_sizes_are_not_read_as_devices(cpu):
    # x.new_zeros(3, 4): positional integers are sizes; an integer is a device ordinal only for .to.
    x = torch.ones(2)
    assert x.new_zeros(3, 4).shape == (3, 4) and x.new_empty(5, 1).shape == (5, 1)
    assert x.new_zeros(3, 4, device="cuda").device.type == "cpu"
    assert x.to(0).device.type == "cpu"
