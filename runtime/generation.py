"""What one generation call takes and gives: its options, checked before anything runs (``DecodeOptions``), the
events it streams (``StreamEvent``), its result (``GenerationResult``) and the detokenizer that turns tokens into
printable pieces (``Detokenizer``). Shared by ``Pipeline`` and ``Session``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from .errors import InputError
from .sampling import SamplingConfig


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    decode_s: float = 0.0
    accept_lengths: list[int] | None = None   # tokens emitted per target call (speculative decoding only)
    speculative: bool = False
    cached_tokens: int = 0     # prompt tokens whose K/V were reused from earlier calls (sessions)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput after the first token (the prefill is in ttft_ms)."""
        n = self.num_new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "num_new_tokens": self.num_new_tokens,
            "stop_reason": self.stop_reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": round(self.ttft_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "speculative": self.speculative,
            **({"mean_accept_length": round(float(np.mean(self.accept_lengths)), 4) if self.accept_lengths else 0.0,
                "accept_lengths": self.accept_lengths} if self.accept_lengths is not None else {}),
        }


@dataclass
class StreamEvent:
    text: str
    final: GenerationResult | None  # set on the last event only


def final_result(events) -> GenerationResult:
    """The result a stream ends with (its last event's), after running it to the end."""
    result = None
    for event in events:
        result = event
    return result.final


@dataclass
class DecodeOptions:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    speculative: bool
    deadline_s: float | None
    stop: tuple[str, ...]
    cancel: object

    @classmethod
    def make(cls, max_new_tokens, temperature, top_p, seed, speculative, deadline_s, stop, cancel, pipe,
             has_images: bool) -> "DecodeOptions":
        """Validated before anything runs: each bad value gets one line naming it and what is expected."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens {max_new_tokens!r}: expected an integer of at least 1")
        try:
            SamplingConfig(temperature, top_p, seed)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        if speculative is None:
            speculative = pipe.speculative_for(has_images)
        elif speculative and not pipe.has_drafter:
            raise InputError(f"{pipe.bundle.path}: this bundle has no drafter; export with --drafter to decode speculatively")
        if deadline_s is not None and not (isinstance(deadline_s, (int, float)) and deadline_s > 0):
            raise InputError(f"deadline_s {deadline_s!r}: expected a positive number of seconds")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise InputError(f"stop {stop!r}: expected a non-empty string or a list of them")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise InputError(f"cancel: a {type(cancel).__name__}; expected a threading.Event (or anything with is_set())")
        return cls(max_new_tokens, temperature, top_p, seed, bool(speculative), deadline_s, stops, cancel)


class Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character, nor text that may turn out to begin a stop
    string (it is held back until it cannot)."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.emitted_text = ""
        self.stopped = False
        self._cut: str | None = None

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def final_text(self) -> str:
        return self._cut if self._cut is not None else self.text()

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted_text):
            return ""
        safe = len(text)
        if self.stops:
            hits = [i for i in (text.find(s, max(0, len(self.emitted_text) - len(s))) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                self._cut = text[: min(hits)]
                return ""
            for s in self.stops:  # hold back a tail that is the start of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        safe = max(safe, len(self.emitted_text))
        piece = text[len(self.emitted_text):safe]
        self.emitted_text = text[:safe]
        return piece
