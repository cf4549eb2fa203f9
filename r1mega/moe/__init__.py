"""Mixture of experts: router (router.py), token dispatch with CUDA kernels (dispatch.py) and
grouped experts (experts.py). Plain imports: ``from r1mega.moe.dispatch import permute_tokens``."""
