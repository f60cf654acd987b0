"""Embedding API: sessions with prefix reuse (many questions per frame, multi-turn, rollback), control (early
close, deadlines, cancellation, stop strings, threads) and the vision cost knobs, each against an independent
call with the whole conversation and, where transformers can say, against transformers' own generate."""

import threading

import numpy as np
import pytest
from PIL import Image

from helpers import hf_model, open_for_hf
from runtime.errors import InputError
from runtime.pipeline import Pipeline

MAX_NEW = 20
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Describe the image.", "Is there a red square?"]


def hf_chat_generate(model_dir, messages, images, max_new_tokens, **processor_options):
    """transformers' answer to a whole conversation (images as PIL, in order), greedy."""
    import torch

    model, processor = hf_model(str(model_dir))
    shown = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
              else [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]}
             for m in messages]
    text = processor.apply_chat_template(shown, add_generation_prompt=True)
    enc = processor(text=text, images=[images] if images else None, return_tensors="pt", **processor_options)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("combo,speculative", [(("split_mha", "random"), False), (("split_mha", "random"), True),
                                               (("tied_loop", "copy"), True), (("gqa_nosplit", "random"), True)],
                         ids=["split-plain", "split-spec", "tied-spec-deep", "gqa-spec"])
def test_session_answers_equal_whole_conversation_calls(zoo, images, combo, speculative):
    """Questions about one frame (rolled back) and a multi-turn chat (kept): each answer equals a fresh call on
    the whole conversation, and only the new tokens are computed."""
    model_dir, bundle = zoo.with_drafter(*combo)
    pipe = Pipeline.from_bundle(bundle)
    frame = np.array(Image.open(images["astronaut"]).convert("RGB"))
    sess = pipe.session(frame, system="You are a robot's eyes.")
    assert sess.length == sess.prefix_tokens > 0
    for keep, question in [(False, QUESTIONS[0]), (False, QUESTIONS[1]), (True, QUESTIONS[2]), (True, QUESTIONS[3]),
                           (False, QUESTIONS[0]), (True, QUESTIONS[1])]:
        messages = sess.messages(question)
        turns_before = len(sess.turns)
        got = sess.ask(question, keep=keep, max_new_tokens=MAX_NEW, speculative=speculative)
        want = pipe.chat(messages, max_new_tokens=MAX_NEW, speculative=False)
        assert got.token_ids == want.token_ids, (keep, question, turns_before)
        assert got.prompt_tokens == want.prompt_tokens and got.cached_tokens >= sess.prefix_tokens
        assert want.cached_tokens == 0
        assert len(sess.turns) == turns_before + keep
        if speculative:
            assert sum(got.accept_lengths) >= len(got.token_ids) - 1
        if keep:
            assert sess.turns[-1] == (question, got.text)
    # the kept conversation, as transformers renders and answers it
    messages = sess.messages(QUESTIONS[2])
    want_hf = hf_chat_generate(model_dir, messages, [Image.fromarray(frame)], MAX_NEW)
    assert sess.ask(QUESTIONS[2], max_new_tokens=MAX_NEW, speculative=speculative).token_ids == want_hf
    sess.reset()
    assert sess.turns == [] and sess.length == sess.prefix_tokens


def test_session_reuses_the_deep_acceptance_drafter_state(zoo, images):
    """The copy drafter accepts deep paths; a session's second question must reuse the drafter's caches, not
    redo them, and still accept (the drafter state is rolled back with the target's)."""
    _, bundle = zoo.with_drafter("tied_loop", "copy")
    pipe = Pipeline.from_bundle(bundle)
    sess = pipe.session([str(images["coffee"])])
    first = sess.ask(QUESTIONS[0], keep=False, max_new_tokens=MAX_NEW, speculative=True)
    upto = sess.ctx.drafter_upto
    assert sess.prefix_tokens <= upto <= sess.length
    second = sess.ask(QUESTIONS[1], keep=False, max_new_tokens=MAX_NEW, speculative=True)
    fresh = pipe.generate([str(images["coffee"])], QUESTIONS[1], max_new_tokens=MAX_NEW, speculative=True)
    assert second.token_ids == fresh.token_ids
    assert sum(a - 1 for a in first.accept_lengths + second.accept_lengths) > 0


def test_text_only_session_and_context_end(zoo):
    _, bundle = zoo.get("ctx_small")  # a 96-token context
    pipe = Pipeline.from_bundle(bundle)
    sess = pipe.session(None)
    a = sess.ask("Is there a red square?", max_new_tokens=8)
    assert a.token_ids == pipe.chat([{"role": "user", "content": "Is there a red square?"}], max_new_tokens=8).token_ids
    with pytest.raises(InputError, match=r"conversation is \d+ tokens.*context is 96"):
        for _ in range(20):  # each kept turn grows the conversation until it no longer fits
            sess.ask("Describe the image. " * 3, max_new_tokens=8)
    assert len(sess.turns) >= 1
    # the refused ask changed nothing; after reset the next question equals a fresh call
    messages = sess.messages("What color is the circle?")
    got = sess.ask("What color is the circle?", keep=False, max_new_tokens=4)
    assert got.token_ids == pipe.chat(messages, max_new_tokens=4).token_ids
    sess.reset()
    got = sess.ask("What color is the circle?", keep=False, max_new_tokens=8)
    assert got.token_ids == pipe.generate(None, "What color is the circle?", max_new_tokens=8).token_ids


@pytest.mark.parametrize("speculative", [False, True])
def test_closing_a_stream_early_leaves_everything_consistent(zoo, images, speculative):
    _, bundle = zoo.with_drafter("split_mha", "random")
    pipe = Pipeline.from_bundle(bundle)
    path = str(images["chelsea"])
    want = pipe.generate(path, QUESTIONS[2], max_new_tokens=MAX_NEW, speculative=speculative)
    stream = pipe.stream(path, QUESTIONS[2], max_new_tokens=MAX_NEW, speculative=speculative)
    next(stream), next(stream)
    stream.close()
    assert pipe.generate(path, QUESTIONS[2], max_new_tokens=MAX_NEW, speculative=speculative).token_ids == want.token_ids
    sess = pipe.session(path)
    s = sess.stream(QUESTIONS[2], keep=True, max_new_tokens=MAX_NEW, speculative=speculative)
    next(s), next(s)
    with pytest.raises(InputError, match="already answering"):
        sess.ask(QUESTIONS[0])
    s.close()  # an unfinished turn is never kept
    assert sess.turns == []
    assert sess.ask(QUESTIONS[2], max_new_tokens=MAX_NEW, speculative=speculative).token_ids == want.token_ids


def test_deadline_cancel_and_stop_strings(zoo, images):
    _, bundle = zoo.with_drafter("split_mha", "random")
    pipe = Pipeline.from_bundle(bundle)
    for name in ("rocket", "astronaut", "coffee", "chelsea", "grace_hopper"):  # an answer long enough to cut
        path = str(images[name])
        full = pipe.generate(path, QUESTIONS[2], max_new_tokens=40, speculative=False)
        if len(full.text) >= 12 and len(full.token_ids) >= 3:
            break
    assert len(full.text) >= 12
    timed = pipe.generate(path, QUESTIONS[2], max_new_tokens=40, deadline_s=1e-9)
    assert timed.stop_reason == "time" and timed.token_ids == full.token_ids[:1]
    cancel = threading.Event()
    cancel.set()
    cancelled = pipe.generate(path, QUESTIONS[2], max_new_tokens=40, cancel=cancel, speculative=True)
    assert cancelled.stop_reason == "cancelled" and cancelled.token_ids == full.token_ids[:1]
    # a stop string taken from the middle of the answer: the text ends right before its first occurrence
    text = full.text
    k = len(text) // 2
    stop = text[k:k + 3]
    assert len(stop) == 3
    for speculative in (False, True):
        events = list(pipe.stream(path, QUESTIONS[2], max_new_tokens=40, stop=["@@never@@", stop], speculative=speculative))
        res = events[-1].final
        assert res.stop_reason == "stop_string" and res.text == text[:text.find(stop)]
        assert "".join(e.text for e in events) == res.text  # nothing of the stop string was ever streamed
        assert res.token_ids == full.token_ids[:len(res.token_ids)]
    for bad, match in [(dict(deadline_s=0), "deadline_s"), (dict(stop=[""]), "stop"), (dict(cancel=True), "cancel"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0), "top_p"),
                       (dict(image_splitting="no"), "image_splitting"), (dict(longest_edge=0), "longest_edge")]:
        with pytest.raises(InputError, match=match):
            pipe.generate(path, QUESTIONS[0], **bad)


def test_four_threads_share_one_pipeline(zoo, images):
    """One pipeline serves several threads behind a lock: answers equal the sequential ones."""
    _, bundle = zoo.with_drafter("gqa_nosplit", "random")
    pipe = Pipeline.from_bundle(bundle)
    jobs = [(str(images[name]), q, spec) for name, q, spec in
            [("astronaut", QUESTIONS[0], True), ("coffee", QUESTIONS[1], False), ("chelsea", QUESTIONS[2], True),
             ("rocket", QUESTIONS[3], False)]]
    want = [pipe.generate(p, q, max_new_tokens=MAX_NEW, speculative=s).token_ids for p, q, s in jobs]
    got: dict[int, list] = {}
    errors = []
    sessions = [pipe.session(p) for p, _, _ in jobs]

    def work(i):
        try:
            p, q, s = jobs[i]
            for _ in range(2):
                got.setdefault(i, []).append(pipe.generate(p, q, max_new_tokens=MAX_NEW, speculative=s).token_ids)
                got[i].append(sessions[i].ask(q, keep=False, max_new_tokens=MAX_NEW, speculative=s).token_ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors
    for i in range(4):
        assert got[i] == [want[i]] * 4


@pytest.mark.parametrize("config", ["split_mha", "layout_256m"])
@pytest.mark.parametrize("options", [dict(image_splitting=False), dict(longest_edge=96), dict(image_splitting=True, longest_edge=200)],
                         ids=["no-split", "edge96", "split-edge200"])
def test_vision_knobs_equal_transformers(zoo, images, config, options):
    model_dir, bundle = zoo.get(config)
    pipe = Pipeline.from_bundle(bundle)
    hf_options = {}
    if "image_splitting" in options:
        hf_options["do_image_splitting"] = options["image_splitting"]
    if "longest_edge" in options:
        hf_options["size"] = {"longest_edge": options["longest_edge"]}
    for name in ("astronaut", "wide_strip"):
        got = pipe.generate(str(images[name]), QUESTIONS[2], max_new_tokens=12, **options)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[2]}]}]
        want = hf_chat_generate(model_dir, messages, [open_for_hf(images[name])], 12, **hf_options)
        assert got.token_ids == want, (name, options)
    default = pipe.prepare(str(images["astronaut"]), QUESTIONS[2])
    knob = pipe.prepare(str(images["astronaut"]), QUESTIONS[2], **options)
    if options.get("image_splitting") is False:  # one tile instead of a grid: less vision and prefill work
        assert len(knob.tiles[0]) == 1 < len(default.tiles[0]) and len(knob.input_ids) < len(default.input_ids)
    if options.get("longest_edge") == 96:
        assert len(knob.tiles[0]) <= len(default.tiles[0])
    sess = pipe.session(str(images["astronaut"]), **options)
    assert sess.ask(QUESTIONS[2], max_new_tokens=12).token_ids == pipe.generate(
        str(images["astronaut"]), QUESTIONS[2], max_new_tokens=12, **options).token_ids


def test_smolvlm_tiny_session_with_its_shipped_drafter(tiny):
    """The built-in model: a session's answers (speculative, with the shipped drafter accepting several tokens per
    step) equal fresh plain calls on the whole conversation, over rolled-back and kept turns."""
    _, bundle = tiny
    pipe = Pipeline.from_bundle(bundle)
    from dream_export.scenes import random_scene

    frame = np.array(random_scene(np.random.default_rng(31_000_000)).render().convert("RGB"))
    for speculative in (True, False):
        sess = pipe.session(frame)
        accepted = 0
        for keep, q in [(False, QUESTIONS[0]), (False, QUESTIONS[1]), (True, QUESTIONS[2]), (True, QUESTIONS[3])]:
            messages = sess.messages(q)
            got = sess.ask(q, keep=keep, max_new_tokens=32, speculative=speculative)
            assert got.token_ids == pipe.chat(messages, max_new_tokens=32, speculative=False).token_ids, (q, speculative)
            assert got.cached_tokens >= sess.prefix_tokens
            if speculative:
                accepted += sum(a - 1 for a in got.accept_lengths)
        assert accepted > 0 or not speculative
