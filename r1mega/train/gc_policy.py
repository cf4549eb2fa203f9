"""Python's garbage collector in a step loop: the long-lived objects frozen out of its scans.

A full (generation 2) collection walks every tracked object: with torch, megatron, the compiled
graphs and the model built, millions of them. It pauses the host, and a host that runs only a few
dozen milliseconds of kernels ahead of the GPU then leaves the GPU idle. After the first step
(everything built, compiled and allocated once) ``gc.freeze()`` moves the objects alive then to a
permanent generation that collections skip; objects made later, cycles included, are still
collected as usual. ``close`` unfreezes them, so that what the loop leaves behind can be freed.
"""
from __future__ import annotations

import gc


class GcFreeze:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.frozen = False

    def after_step(self) -> None:
        if self.enabled and not self.frozen:
            gc.collect()   # no garbage into the permanent generation
            gc.freeze()
            self.frozen = True

    def close(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
