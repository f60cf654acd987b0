"""Frames as the caller has them: numpy arrays (RGB, BGR, RGBA, grayscale), PIL images and paths give the same
preprocessing as a file with those pixels, checked against the HF processor; bad arrays get a clear error."""

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.pipeline import Pipeline
from runtime.preprocess import load_image


def _hf_pixels(model_dir, pil_images, prompt):
    from helpers import hf_model

    _, processor = hf_model(str(model_dir))
    messages = [{"role": "user", "content": [{"type": "image"} for _ in pil_images] + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=[pil_images], return_tensors="pt")


def test_numpy_frames_match_files_and_the_hf_processor(zoo, images):
    model_dir, bundle = zoo.get("split_mha")
    pipe = Pipeline.from_bundle(bundle)
    prompt = "What is in the picture?"
    for name in ("coffee", "astronaut", "chelsea"):
        path = images[name]
        rgb = np.array(load_image(path).convert("RGB"))
        from_file = pipe.prepare([str(path)], prompt)
        variants = {
            "rgb": pipe.prepare([rgb], prompt),
            "bgr": pipe.prepare([np.ascontiguousarray(rgb[:, :, ::-1])], prompt, bgr=True),
            "single": pipe.prepare(rgb, prompt),  # one frame, not in a list
            "pil": pipe.prepare([Image.fromarray(rgb)], prompt),
            "rgba": pipe.prepare([np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])], prompt),
        }
        for kind, prep in variants.items():
            assert prep.input_ids.tolist() == from_file.input_ids.tolist(), (name, kind)
            np.testing.assert_array_equal(np.concatenate(prep.tiles), np.concatenate(from_file.tiles), err_msg=f"{name} {kind}")
        ref = _hf_pixels(model_dir, [Image.fromarray(rgb)], prompt)
        assert variants["rgb"].input_ids.tolist() == ref["input_ids"][0].tolist(), name
        assert np.abs(np.concatenate(variants["rgb"].tiles) - ref["pixel_values"][0].numpy()).max() <= 1e-5, name
    # grayscale frames (H x W uint8): the processor's RGB conversion of an "L" image
    # and translucent RGBA (composited on white, as the processor does)
    for name in ("camera_gray", "rgba"):
        arr = np.array(load_image(images[name]))
        assert arr.ndim == (2 if name == "camera_gray" else 3)
        ref = _hf_pixels(model_dir, [Image.fromarray(arr)], prompt)
        got = pipe.prepare([arr], prompt)
        assert got.input_ids.tolist() == ref["input_ids"][0].tolist(), name
        assert np.abs(np.concatenate(got.tiles) - ref["pixel_values"][0].numpy()).max() <= 1e-5, name
        np.testing.assert_array_equal(np.concatenate(got.tiles), np.concatenate(pipe.prepare([str(images[name])], prompt).tiles))


def test_generate_from_a_frame_equals_generate_from_its_file(zoo, images):
    _, bundle = zoo.get("gqa_nosplit")
    pipe = Pipeline.from_bundle(bundle)
    path = images["coffee"]
    frame = np.array(load_image(path).convert("RGB"))
    a = pipe.generate([str(path)], "Describe the image.", max_new_tokens=12)
    b = pipe.generate(frame[:, :, ::-1], "Describe the image.", max_new_tokens=12, bgr=True)
    assert a.token_ids == b.token_ids
    assert pipe.generate(None, "Hello", max_new_tokens=4).num_new_tokens >= 1  # None: text-only


@pytest.mark.parametrize("bad, what", [
    (np.zeros((8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8, 2), np.uint8), "shape (8, 8, 2)"),
    (np.zeros((0, 8, 3), np.uint8), "shape (0, 8, 3)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3)"),
    (12, "a int"),
])
def test_bad_frames_name_what_was_wrong(zoo, bad, what):
    _, bundle = zoo.get("gqa_nosplit")
    pipe = Pipeline.from_bundle(bundle)
    with pytest.raises(InputError, match="expected") as err:
        pipe.prepare([bad], "What is it?")
    assert what in str(err.value) and "image 0" in str(err.value)
