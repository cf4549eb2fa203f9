"""A one-entry memo for the tables a forward's layers share (the step's attention slots, query
rows and tile tables): each layer asks with the same key, and building them again per layer would
repeat small kernels and, where lengths are copied to the device, wait for the stream each time.

Tensors and other objects in a key compare by identity, and the memo holds them, so a freed
object's id can never match a later one; plain values (numbers, strings, dtypes, devices, shapes
and tuples of them) compare by value. Callers put a tensor's ``_version`` beside it where it may be
refilled in place.
"""
from __future__ import annotations

from typing import Callable

import torch

_VALUES = (int, float, bool, str, type(None), torch.Size, torch.device, torch.dtype)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return isinstance(a, _VALUES) and type(a) is type(b) and a == b


class LastKey:
    """The value made for the last key asked for."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, key: tuple, make: Callable):
        if self.key is None or not _same(self.key, key):
            self.value = make()
            self.key = key
        return self.value
