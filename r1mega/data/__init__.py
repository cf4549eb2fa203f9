"""Prompt data: datasets (JSONL/Parquet), procedural tasks, templates, tokenizers, the DP sampler.

The trainer's entry points: :func:`build_prompt_source`, :class:`PromptSampler`,
:func:`load_tokenizer`, :func:`encode_prompt`.
"""
from r1mega.data.datasets import BadRowError, PromptRecord, load_prompt_file
from r1mega.data.sampler import PromptSampler
from r1mega.data.source import build_prompt_source
from r1mega.data.templates import encode_prompt, render_prompt
from r1mega.data.tokenizer import load_tokenizer

__all__ = ["BadRowError", "PromptRecord", "PromptSampler", "build_prompt_source",
           "encode_prompt", "load_prompt_file", "load_tokenizer", "render_prompt"]
