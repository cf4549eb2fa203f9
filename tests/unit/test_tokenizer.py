"""Tokenizers behind one interface: char, SentencePiece (a real .model), HF tokenizer.json and an
HF directory with a chat template; and the prompt templates on top."""
import json
import os

import pytest

from r1mega.data import encode_prompt, load_tokenizer, render_prompt
from r1mega.data.templates import R1_ZERO_TEMPLATE

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
SP_MODEL = os.path.join(ASSETS, "botchan_en_unigram_1000.model")


def test_char_tokenizer():
    tok = load_tokenizer("char")
    assert tok.vocab_size <= 128 and len(set(tok.id_to_token)) == len(tok.id_to_token)
    assert len({tok.pad_id, tok.eos_id, tok.bos_id}) == 3
    text = "<think>23+58 is 81</think>\n<answer>81</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size
    assert len(tok.encode("<think>")) == 1 and len(tok.encode("<thinker>")) == 9
    assert tok.encode("x", add_bos=True)[0] == tok.bos_id
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"
    assert tok.decode(tok.encode("é")) == ""  # unknown -> unk, dropped on decode


def test_sentencepiece_against_the_library():
    spm = pytest.importorskip("sentencepiece")
    ref = spm.SentencePieceProcessor(model_file=SP_MODEL)
    tok = load_tokenizer(SP_MODEL)
    text = "I am a cat. As yet I have no name."
    assert tok.encode(text) == list(ref.encode(text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == ref.get_piece_size() == 1000
    assert tok.eos_id == ref.eos_id() and tok.bos_id == ref.bos_id()
    assert tok.pad_id >= 0
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"


def _write_hf_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "!": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}"}))
    return t


def test_hf_tokenizer_json_and_directory(tmp_path):
    pytest.importorskip("tokenizers")
    ref = _write_hf_dir(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.encode("hello world !") == ref.encode("hello world !").ids == [3, 4, 5]
    assert tok.eos_id == 2 and tok.bos_id == 1 and tok.vocab_size == 6
    assert tok.decode([3, 4]) == "hello world"
    d = load_tokenizer(str(tmp_path))
    assert d.encode("hello world") == [3, 4] and d.eos_id == 2
    msgs = [{"role": "user", "content": "hello"}]
    assert d.apply_chat_template(msgs) == "<user>hello<assistant>"
    assert render_prompt("hello", "chat", d).endswith("<user>hello<assistant>")


def test_smollm2_gguf_tokenizer_and_chat_template(smollm2_gguf):
    """A real instruct model's tokenizer (SmolLM2-135M-Instruct's GGUF)."""
    pytest.importorskip("gguf")
    tok = load_tokenizer(smollm2_gguf)
    assert tok.vocab_size == 49152
    assert tok.decode([tok.eos_id], skip_special=False) == "<|im_end|>"
    text = "Natalia sold 48 clips in April."
    assert tok.decode(tok.encode(text)) == text
    prompt = render_prompt("What is 2+3?", "chat", tok)
    assert "<|im_start|>user\nWhat is 2+3?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<think>" in prompt  # the R1 instruction rides in the system turn


def test_templates_and_prompt_budget():
    tok = load_tokenizer("char")
    r1 = render_prompt("23+58=", "r1_zero")
    assert r1 == R1_ZERO_TEMPLATE.format(prompt="23+58=") and r1.endswith("User: 23+58=. Assistant:")
    assert "<think>" in r1 and "<answer>" in r1
    assert render_prompt("23+58=", "raw") == "23+58="
    assert render_prompt("q", "chat", tok) == ("System: " + render_prompt.__globals__["R1_SYSTEM"]
                                               + "\nUser: q\nAssistant:")
    assert encode_prompt("23+58=", "raw", tok, 16) == [tok.bos_id] + tok.encode("23+58=")
    with pytest.raises(ValueError, match="max_prompt_tokens=8"):
        encode_prompt("123456789+1=", "raw", tok, 8)
    with pytest.raises(ValueError, match="data.template='fancy'"):
        render_prompt("q", "fancy")
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer("/nope/tokenizer.model")
