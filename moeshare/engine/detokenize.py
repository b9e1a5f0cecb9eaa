"""Incremental detokenization and stop conditions: what text a new token adds, and whether it ends the request."""

from __future__ import annotations

from pathlib import Path

from tokenizers.decoders import DecodeStream
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


def _backend(tokenizer):
    """The Rust tokenizer that decodes a stream one token at a time, or None: decode the whole output each
    time (no tokenizer, a slow one, or one whose decode also cleans up spaces, which a stream cannot)."""
    if tokenizer is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return getattr(tokenizer, "backend_tokenizer", None)


class Detokenizer:
    """Per running sequence, the text streamed so far."""

    def __init__(self, tokenizers: dict, eos: set[int], context: int) -> None:
        self.tokenizers, self.eos, self.context = tokenizers, eos, context
        self.backends = {m: _backend(t) for m, t in tokenizers.items()}
        self.texts: dict[int, str] = {}  # streamed to the client
        self.decoded: dict[int, str] = {}  # decoded so far (streamed sequences)
        self.streams: dict[int, DecodeStream | None] = {}  # None: this one decodes whole

    def _decode(self, seq: Sequence, token: int) -> str:
        """The text of seq.output_ids, one step further than last time (O(1) per token when streamed)."""
        backend = self.backends[seq.model]
        tokenizer = self.tokenizers[seq.model]
        stream = self.streams.get(seq.seq_id, ...)
        if backend is None or stream is None:
            return tokenizer.decode(seq.output_ids, skip_special_tokens=True) if tokenizer else ""
        if stream is ...:
            stream = self.streams[seq.seq_id] = DecodeStream(skip_special_tokens=True)
        try:
            piece = stream.step(backend, token) or ""
        except Exception:  # a stream that cannot go on (e.g. an invalid prefix): decode whole from now on
            self.streams[seq.seq_id] = None
            return tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        text = self.decoded.get(seq.seq_id, "") + piece
        self.decoded[seq.seq_id] = text
        return text

    def advance(self, seq: Sequence, token: int) -> tuple[str, FinishReason | None]:
        """After `token` joined seq.output_ids: the text it adds, and why the sequence ends (None: it goes on)."""
        p = seq.params
        old = self.texts.get(seq.seq_id, "")
        text = self._decode(seq, token)
        reason = None
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            reason = FinishReason.STOP
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and len(seq) >= self.context:
            reason = FinishReason.CONTEXT
        if reason is not None and self.streams.get(seq.seq_id) is not None:
            # the whole decode once at the end: a stream holds back an incomplete character that it shows
            text = self.tokenizers[seq.model].decode(seq.output_ids, skip_special_tokens=True)
        for stop in p.stop:
            at = text.find(stop, max(0, len(old) - len(stop)))
            if at >= 0:
                text, reason = text[:at], FinishReason.STOP
        stable = text if reason else settled(text, p.stop)
        delta = stable[len(old) :] if stable.startswith(old) else ""
        self.texts[seq.seq_id] = old + delta
        return delta, reason

    def forget(self, seq_id: int) -> None:
        self.texts.pop(seq_id, None)
        self.decoded.pop(seq_id, None)
        self.streams.pop(seq_id, None)
