"""Prefix reuse, measured: time to first token of a frame's second question through a session, against a fresh
call with the same frame and question, and of a chat's third turn against a fresh call on the whole conversation.
Both sides run in this process, warm, alternating, on the same frames.

    python benchmarks/session_reuse.py --bundle BUNDLE [--frames 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Is there a red square?", "Describe the image."]


def frames(n: int, seed: int = 20_000_000):
    from dream_export.scenes import random_scene

    rng = np.random.default_rng(seed)
    return [np.array(random_scene(rng).render().convert("RGB")) for _ in range(n)]


def measure(bundle: str, n_frames: int, max_new_tokens: int = 16) -> dict:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    imgs = frames(n_frames)
    pipe.generate(imgs[0], QUESTIONS[0], max_new_tokens=2)  # warm
    fresh_q2, sess_q2, fresh_t3, sess_t3, frame_fresh, frame_sess, cached = [], [], [], [], [], [], []
    for img in imgs:
        # a frame's questions: fresh calls
        rs = [pipe.generate(img, q, max_new_tokens=max_new_tokens) for q in QUESTIONS[:3]]
        fresh_q2.append(rs[1].ttft_ms)
        frame_fresh.append(sum(r.ttft_ms + r.decode_s * 1e3 for r in rs))
        # the same through one session (its creation counted in the frame's total)
        import time

        t0 = time.perf_counter()
        sess = pipe.session(img)
        setup = (time.perf_counter() - t0) * 1e3
        ss = [sess.ask(q, keep=False, max_new_tokens=max_new_tokens) for q in QUESTIONS[:3]]
        assert [s.token_ids for s in ss] == [r.token_ids for r in rs]
        sess_q2.append(ss[1].ttft_ms)
        cached.append(ss[1].cached_tokens / ss[1].prompt_tokens)
        frame_sess.append(setup + sum(s.ttft_ms + s.decode_s * 1e3 for s in ss))
        # multi-turn: the third turn
        chat = pipe.session(img)
        for q in QUESTIONS[:2]:
            chat.ask(q, max_new_tokens=max_new_tokens)
        messages = chat.messages(QUESTIONS[3])
        fresh = pipe.chat(messages, max_new_tokens=max_new_tokens)
        turn = chat.ask(QUESTIONS[3], max_new_tokens=max_new_tokens)
        assert turn.token_ids == fresh.token_ids
        fresh_t3.append(fresh.ttft_ms)
        sess_t3.append(turn.ttft_ms)
    med = lambda xs: round(float(np.median(xs)), 2)  # noqa: E731
    return {
        "bundle": str(bundle), "frames": n_frames, "speculative": pipe.speculative_default,
        "second_question_ttft_ms": {"fresh": med(fresh_q2), "session": med(sess_q2),
                                    "speedup": round(med(fresh_q2) / med(sess_q2), 2)},
        "second_question_cached_fraction": round(float(np.mean(cached)), 3),
        "third_turn_ttft_ms": {"fresh": med(fresh_t3), "session": med(sess_t3), "speedup": round(med(fresh_t3) / med(sess_t3), 2)},
        "frame_3_questions_ms": {"fresh": med(frame_fresh), "session": med(frame_sess),
                                 "speedup": round(med(frame_fresh) / med(frame_sess), 2)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = measure(str(args.bundle), args.frames, args.max_new_tokens)
    from dream_export.reports import emit

    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
