"""``Session``: a conversation about fixed image(s) that keeps the K/V of everything already computed."""

from __future__ import annotations

import time
from typing import Iterator

from .errors import InputError
from .generation import DecodeOptions, GenerationResult, StreamEvent, final_result
from .messages import image_list, normalize_messages, user_message
from .preprocess import as_image


class Session:
    """A conversation about fixed image(s), keeping the K/V of everything already computed.

    Created by ``Pipeline.session``: the images go through vision once and the prompt up to the first question
    (system message, user turn header, image tokens) is prefilled once. ``ask(prompt)`` renders the whole
    conversation with the model's chat template, keeps the longest cached prefix of its tokens and computes
    only the rest, so its answer is the one ``Pipeline.chat`` gives for the same conversation (tested token for
    token). ``keep=True`` (default) adds the question and answer to the conversation (multi-turn); ``keep=False``
    rolls back to the state before the question (many independent questions about one frame). The drafter's
    caches follow the same rule. A conversation that no longer fits the context gets an ``InputError`` naming
    its length; ``reset()`` drops every turn but keeps the image prefix."""

    def __init__(self, pipe, images=None, system: str | None = None, bgr: bool = False,
                 image_splitting: bool | None = None, longest_edge: int | None = None):
        self.pipe = pipe  # the runtime.Pipeline whose graphs, lock and decoding loop the session uses
        self.images = [as_image(im, i, bgr) for i, im in enumerate(image_list(images))]
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (question, answer) kept
        self._vision = (image_splitting, longest_edge)
        self._busy = False
        with pipe.lock:
            self.ctx = pipe.new_context()
            sentinel = "\x00dream-export-question\x00"
            shown, images = normalize_messages(self.messages(sentinel))
            text = pipe.render(shown, add_generation_prompt=False)
            if text.count(sentinel) != 1:
                raise InputError("the chat template does not render the question verbatim; sessions need it to")
            prep = pipe.encode(text.split(sentinel)[0], images, False, *self._vision)
            self.ctx.set_images(pipe.vision(prep.tiles, prep.images), prep.images)
            self.prefix_tokens = len(prep.input_ids)
            if self.prefix_tokens:
                self.ctx.prefill(prep.input_ids)

    def messages(self, prompt: str) -> list[dict]:
        """The whole conversation that ``ask(prompt)`` answers (what ``Pipeline.chat`` would be given)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i, (q, a) in enumerate(self.turns):
            msgs += user_message(self.images if i == 0 else None, q)
            msgs.append({"role": "assistant", "content": a})
        return msgs + user_message(self.images if not self.turns else None, prompt)

    @property
    def length(self) -> int:
        """Tokens whose K/V the session holds."""
        return self.ctx.length

    def ask(self, prompt: str, keep: bool = True, **kwargs) -> GenerationResult:
        return final_result(self.stream(prompt, keep, **kwargs))

    def stream(self, prompt: str, keep: bool = True, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
               deadline_s: float | None = None, stop=None, cancel=None) -> Iterator[StreamEvent]:
        """As ``Pipeline.stream_chat`` over ``messages(prompt)``. A stream closed before its last event keeps
        nothing of that turn, whatever ``keep`` says."""
        pipe = self.pipe
        opts = DecodeOptions.make(max_new_tokens, temperature, top_p, seed, speculative, deadline_s, stop, cancel, pipe,
                                  bool(self.images))
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty; expected a question or instruction")
        with pipe.lock:
            if self._busy:
                raise InputError("this session is already answering (a stream is open); finish or close it first")
            self._busy = True
            try:
                t0 = time.perf_counter()
                shown, images = normalize_messages(self.messages(prompt))
                text = pipe.render(shown)
                ids = pipe.encode(text, images, False, *self._vision, check=False).input_ids
                if len(ids) >= pipe.max_positions:
                    raise InputError(f"the conversation is {len(ids)} tokens with this question; the context is "
                                     f"{pipe.max_positions}: ask with keep=False, reset() or start a new session")
                before = min(self.ctx.common_prefix(ids), len(ids) - 1)
                final = None
                try:
                    for event in pipe.stream_on(self.ctx, ids, opts, t0):
                        final = event.final
                        yield event
                finally:
                    if final is not None and keep:
                        self.turns.append((prompt, final.text))
                    else:  # rolled back: the question, the answer and anything an early close left behind
                        self.ctx.truncate(before)
            finally:
                self._busy = False

    def reset(self) -> None:
        """Forget every turn; the image prefix stays cached."""
        self.turns.clear()
        self.ctx.truncate(self.prefix_tokens)
