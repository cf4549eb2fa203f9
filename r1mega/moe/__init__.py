"""Mixture of experts: router (router.py), token dispatch with CUDA kernels (dispatch.py), grouped
experts (experts.py) and expert parallelism's all-to-all dispatcher (token_dispatcher.py).
Plain imports: ``from r1mega.moe.dispatch import permute_tokens``."""
