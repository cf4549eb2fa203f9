"""DeepSeek-V3's released FP8 weights: float8_e4m3fn with one float32 ``weight_scale_inv`` per
128 x 128 block, dequantised on load (``full = fp8 * scale_inv`` blockwise).

:func:`quantize_blockwise` is the inverse used to make FP8 test checkpoints (and by anyone who
wants to write that format): per block, ``scale_inv = amax / 448`` (448 = float8_e4m3fn's max).
"""
from __future__ import annotations

import torch

BLOCK = 128
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_DTYPES = (torch.float8_e4m3fn,)


def scale_name(weight_name: str) -> str:
    """HF name of the block scales of ``weight_name`` (``...weight`` -> ``...weight_scale_inv``)."""
    return weight_name + "_scale_inv"


def _expand(scale_inv: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """(ceil(R/b), ceil(C/b)) -> (R, C): each block's scale over its entries (edge blocks cut)."""
    return scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def dequantize_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         name: str = "?") -> torch.Tensor:
    """w (R, C) float8, scale_inv (ceil(R/b), ceil(C/b)) float32 -> (R, C) float32."""
    if w.dim() != 2:
        raise ValueError(f"FP8 tensor '{name}' has {w.dim()} dims; block scales need a matrix.")
    rows, cols = w.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"'{scale_name(name)}' has shape {list(scale_inv.shape)}, but {block}x{block} "
                         f"blocks of '{name}' {list(w.shape)} need {list(want)}.")
    return w.float() * _expand(scale_inv.float(), rows, cols, block)


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) -> (float8_e4m3fn (R, C), scale_inv float32 (ceil(R/b), ceil(C/b)))."""
    rows, cols = w.shape
    pr, pc = -(-rows // block) * block, -(-cols // block) * block
    padded = torch.zeros(pr, pc, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(pr // block, block, pc // block, block)               # (Rb, b, Cb, b)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)                     # (Rb, Cb)
    scale_inv = amax / FP8_MAX
    q = (w.float() / _expand(scale_inv, rows, cols, block)).to(torch.float8_e4m3fn)
    return q, scale_inv
