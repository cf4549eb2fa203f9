"""One tokenizer interface over SentencePiece, Hugging Face and a built-in character vocabulary.

``load_tokenizer(spec)``: ``"char"`` → :class:`CharTokenizer` (the CPU demo's: ≤ 128 ids, the R1
tags as single tokens); a path ending in ``.model`` → SentencePiece; a ``tokenizer.json`` file →
the ``tokenizers`` library; a directory or a ``.gguf`` file → transformers' ``AutoTokenizer`` (with
its chat template).
All expose ``encode``, ``decode``, ``eos_id``, ``pad_id``, ``bos_id``, ``vocab_size`` and
``apply_chat_template(messages) -> str``.
"""
from __future__ import annotations

import os
import string

from r1mega.errors import UserFileError, UserValueError

# Used when a tokenizer carries no chat template of its own (SentencePiece files, tokenizer.json,
# the char vocabulary): plain role-prefixed turns, ending with the assistant's turn opened.
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat(messages: list, add_generation_prompt: bool = True) -> str:
    parts = []
    for m in messages:
        role = _PLAIN_ROLES.get(m["role"], m["role"].capitalize())
        parts.append(f"{role}: {m['content']}")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "\n".join(parts)


class CharTokenizer:
    """Printable ASCII + newline/tab, one id per character, plus special tokens.

    Ids: 0 pad, 1 bos, 2 eos, 3 unk, 4..7 ``<think> </think> <answer> </answer>``, then the 97
    characters; 105 ids used, ``vocab_size`` 128 (the rest reserved) to match the demo model.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>", "<answer>", "</answer>")
    vocab_size = 128

    def __init__(self):
        chars = string.printable[:95] + "\n\t"  # digits, letters, punctuation, space; \n \t
        chars = "".join(sorted(set(chars) - {"\r", "\x0b", "\x0c"}, key=chars.index))
        self.id_to_token = list(self.SPECIALS) + list(chars)
        assert len(self.id_to_token) <= self.vocab_size
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self._tags = self.SPECIALS[4:]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            if text[i] == "<":
                for tag in self._tags:  # the tags are single tokens, as in R1's vocabularies
                    if text.startswith(tag, i):
                        ids.append(self.token_to_id[tag])
                        i += len(tag)
                        break
                else:
                    ids.append(self.token_to_id["<"])
                    i += 1
                continue
            ids.append(self.token_to_id.get(text[i], self.unk_id))
            i += 1
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < 4:
                if not skip_special and i < len(self.id_to_token):
                    out.append(self.id_to_token[i])
                continue
            if i < len(self.id_to_token):
                out.append(self.id_to_token[i])
        return "".join(out)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        return plain_chat(messages, add_generation_prompt)


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.path = path
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
        pad = int(self.sp.pad_id())
        # Many SentencePiece models define no pad (-1); eos pads safely because padded positions
        # are masked out of every loss.
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self.sp.encode(text))
        return ([self.bos_id] if add_bos and self.bos_id >= 0 else []) + ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.sp.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        return plain_chat(messages, add_generation_prompt)


class HFTokenizer:
    """A ``tokenizer.json`` (``tokenizers``) or a Hugging Face directory (transformers)."""

    def __init__(self, path: str):
        self.path = path
        self._hf = None
        if os.path.isdir(path) or path.endswith(".gguf"):
            from transformers import AutoTokenizer

            if path.endswith(".gguf"):  # the tokenizer and chat template stored in a GGUF file
                self._hf = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                         gguf_file=os.path.basename(path))
            else:
                self._hf = AutoTokenizer.from_pretrained(path)
            self._tok = self._hf.backend_tokenizer if hasattr(self._hf, "backend_tokenizer") else None
            self.vocab_size = len(self._hf)
            self.bos_id = self._hf.bos_token_id if self._hf.bos_token_id is not None else -1
            self.eos_id = self._hf.eos_token_id if self._hf.eos_token_id is not None else -1
            pad = self._hf.pad_token_id
        else:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(path)
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self.bos_id = self._find(("<s>", "<|begin_of_text|>", "<|im_start|>", "<bos>"))
            self.eos_id = self._find(("</s>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
                                      "<eos>"))
            pad = self._find(("<pad>", "<|pad|>"))
            pad = pad if pad >= 0 else None
        self.pad_id = pad if pad is not None else self.eos_id

    def _find(self, names) -> int:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return int(i)
        return -1

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False)
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id >= 0 else []) + list(ids)

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        if self._hf is not None and getattr(self._hf, "chat_template", None):
            return self._hf.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        return plain_chat(messages, add_generation_prompt)


def load_tokenizer(spec: str):
    """``data.tokenizer`` → a tokenizer. Errors name the key and what is accepted."""
    if spec == "char":
        return CharTokenizer()
    if not os.path.exists(spec):
        raise UserFileError(f"data.tokenizer='{spec}' does not exist; use 'char', a "
                                "SentencePiece .model file, a tokenizer.json, or an HF directory.")
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.endswith((".json", ".gguf")):
        return HFTokenizer(spec)
    raise UserValueError(f"data.tokenizer='{spec}': unknown file type; expected .model "
                     "(SentencePiece), tokenizer.json, .gguf, or an HF directory.")
