"""The scene generator follows its spec and is deterministic by seed."""

import numpy as np

from dream_export.scenes import COLORS, SHAPES, random_scene, scene_examples


def test_scenes_follow_the_spec():
    rng = np.random.default_rng(123)
    for _ in range(120):
        s = random_scene(rng)
        assert 64 <= s.width <= 1024 and 64 <= s.height <= 1024
        assert 1 <= len(s.shapes) <= 4
        short = min(s.width, s.height)
        for a in s.shapes:
            assert a.kind in SHAPES and a.color in COLORS
            assert 0.15 * short <= a.size <= 0.35 * short
            assert a.size / 2 <= a.cx <= s.width - a.size / 2 and a.size / 2 <= a.cy <= s.height - a.size / 2
        img = np.array(s.render())
        assert img.shape == (s.height, s.width, 3)
        colours = {tuple(c) for c in np.unique(img.reshape(-1, 3), axis=0)}
        assert colours <= {(255, 255, 255), *COLORS.values()}  # pure colours on white, no blending
        for a in s.shapes:  # each shape's centre pixel has its colour: nothing overlaps it
            assert tuple(img[int(a.cy), int(a.cx)]) == COLORS[a.color]


def test_scene_examples_are_deterministic():
    a = list(scene_examples(5, 20))
    b = list(scene_examples(5, 20))
    c = list(scene_examples(6, 20))
    assert a == b and a != c
    assert {qa.qtype for _, qa in a} == {"caption", "count", "color_count", "color", "shape", "yesno", "where"}
    assert all(qa.answer in qa.accepted for _, qa in a)


def test_answers_are_consistent_with_the_scene():
    from dream_export.scenes import caption_names_every_shape

    for scene, qa in scene_examples(9, 60):
        qtype, prompt, answer = qa.qtype, qa.prompt, qa.answer
        if qtype == "count":
            from dream_export.scenes import NUMBER_WORDS

            assert NUMBER_WORDS[len(scene.shapes)] in answer
        if qtype == "caption":
            assert caption_names_every_shape(scene, answer)
            assert not caption_names_every_shape(scene, answer.replace(scene.shapes[0].color, "purple"))
        if qtype == "yesno":
            color, kind = prompt.rstrip("?").split()[-2:]
            assert answer.startswith("Yes") == any(s.color == color and s.kind == kind for s in scene.shapes)
