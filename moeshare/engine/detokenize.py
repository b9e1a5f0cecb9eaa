"""Incremental detokenization and stop conditions: what text a new token adds, and whether it ends the request."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from moeshare.engine.request import FinishReason, Sequence
from moeshare.errors import MoeshareError, summary


def load_tokenizer(directory: Path | None):
    """The model's tokenizer, or None where it has none (then requests send token ids); a tokenizer that
    does not load is one line naming its directory."""
    if directory is None or not any(
        (Path(directory) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, JSON errors)
        what = summary(e)
        raise MoeshareError(
            f"{directory}: the tokenizer does not load ({what}); repair or remove it"
        ) from None


def token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers, so a prompt too long for the context is refused
    before it is tokenized."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1


def settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a running request's text that can be streamed: an incomplete UTF-8 character, or a tail
    that may be the start of a stop string, waits for the next token."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


class Detokenizer:
    """Per running sequence, the text streamed so far."""

    def __init__(self, tokenizers: dict, eos: set[int], context: int) -> None:
        self.tokenizers, self.eos, self.context = tokenizers, eos, context
        self.texts: dict[int, str] = {}

    def advance(self, seq: Sequence, token: int) -> tuple[str, FinishReason | None]:
        """After `token` joined seq.output_ids: the text it adds, and why the sequence ends (None: it goes on)."""
        p = seq.params
        tokenizer = self.tokenizers[seq.model]
        old = self.texts.get(seq.seq_id, "")
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True) if tokenizer else ""
        reason = None
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            reason = FinishReason.STOP
        for stop in p.stop:
            at = text.find(stop, max(0, len(old) - len(stop)))
            if at >= 0:
                text, reason = text[:at], FinishReason.STOP
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and len(seq) >= self.context:
            reason = FinishReason.CONTEXT
        stable = text if reason else settled(text, p.stop)
        delta = stable[len(old) :] if stable.startswith(old) else ""
        self.texts[seq.seq_id] = old + delta
        return delta, reason

    def forget(self, seq_id: int) -> None:
        self.texts.pop(seq_id, None)
