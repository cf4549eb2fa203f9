"""Stop conditions of a sequence: EOS ids, stop strings, length limits.

Stop strings are found in decoded text, so they need the tokenizer's decode function. Decoding the
whole completion every step would cost O(n^2) over a long reasoning trace; each step decodes
only a short tail (enough tokens to hold the longest stop string) and the full text is decoded
once, when a stop string shows up, to cut it at the right place.
"""
from __future__ import annotations

from typing import Callable, Optional

from r1mega.rollout.scheduler import Sequence


class StopChecker:
    def __init__(self, eos_ids, decode_fn: Optional[Callable[[list], str]], max_positions: int):
        self.eos_ids = frozenset(int(e) for e in (eos_ids or ()))
        self.decode_fn = decode_fn
        self.max_positions = max_positions

    def require_decode_for(self, stop: tuple, where: str) -> None:
        if stop and self.decode_fn is None:
            raise ValueError(
                f"{where} sets stop strings {list(stop)!r} but the rollout engine was built without "
                f"decode_fn; pass decode_fn=tokenizer.decode to RolloutEngine or drop the stop strings."
            )

    def check(self, seq: Sequence) -> bool:
        """After a new token: set ``seq.finish_reason`` (and text cut) if the sequence is done."""
        token = seq.tokens[-1]
        if token in self.eos_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if seq.params.stop and self._stop_string(seq):
            return True
        if seq.num_generated >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
            return True
        if self.max_positions and len(seq.tokens) >= self.max_positions:
            seq.finish_reason = "length"
            return True
        return False

    def _stop_string(self, seq: Sequence) -> bool:
        stops = seq.params.stop
        window = max(len(s) for s in stops) + 4  # tokens: each decodes to >= 1 char, usually
        tail = self.decode_fn(seq.generated[-window:])
        if not any(s in tail for s in stops):
            return False
        text = self.decode_fn(seq.generated)
        hits = [(text.find(s), s) for s in stops if s in text]
        if not hits:  # the tail decoded differently from the whole; trust the whole text
            return False
        idx, stop = min(hits)
        seq.finish_reason, seq.stop_reason = "stop", stop
        # Keep the stop string itself (rewards look for e.g. "</answer>"), drop what the last
        # token added after it. token_ids keep that last token: it was sampled and is trained on.
        seq.text = text[: idx + len(stop)]
        return True
