"""Prompt templates: DeepSeek-R1-Zero's instruction, the tokenizer's chat template, or raw text.

``data.template``:
* ``r1_zero`` — the R1-Zero paper's template: the model must reason in ``<think>`` and answer in
  ``<answer>``; the completion starts right after "Assistant:".
* ``chat`` — the tokenizer's own chat template with the question as the user's turn (with the
  R1 tag instruction as the system turn, so instruct models learn the same format).
* ``raw`` — the prompt text unchanged (the CPU demo's ``23+58=``).
"""
from __future__ import annotations

from r1mega.errors import UserValueError

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
R1_SYSTEM = (
    "You are a helpful assistant. You first think about the reasoning process in the mind and "
    "then provide the answer. The reasoning process and answer are enclosed within <think> "
    "</think> and <answer> </answer> tags, respectively."
)
TEMPLATES = ("r1_zero", "chat", "raw")


def render_prompt(prompt: str, template: str, tokenizer=None) -> str:
    if template == "r1_zero":
        return R1_ZERO_TEMPLATE.format(prompt=prompt.strip())
    if template == "raw":
        return prompt
    if template == "chat":
        if tokenizer is None:
            raise UserValueError("data.template='chat' needs the tokenizer (its chat template).")
        messages = [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages)
    raise UserValueError(f"data.template='{template}' is not one of {list(TEMPLATES)}.")


def encode_prompt(prompt: str, template: str, tokenizer, max_prompt_tokens: int,
                  add_bos: bool = True) -> list[int]:
    """Render and tokenize; a prompt over the budget is an error, never silently cut (a cut
    prompt can lose the question and still be rewarded against its answer)."""
    text = render_prompt(prompt, template, tokenizer)
    # Chat templates already spell out their BOS; adding one again would double it.
    ids = tokenizer.encode(text, add_bos=add_bos and template != "chat")
    if max_prompt_tokens and len(ids) > max_prompt_tokens:
        raise UserValueError(f"prompt of {len(ids)} tokens is over data.max_prompt_tokens="
                         f"{max_prompt_tokens} (starts {prompt[:60]!r}); raise the limit or "
                         "filter the dataset.")
    return ids
