"""Shared test fixtures' machinery: tiny SmolVLMs built offline, images written to disk, HF references."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = [
    "What color is the circle?",
    "Describe the image.",
    "How many shapes are there?",
    "Is there a red square?",
    "What is in this picture? Answer in one word.",
]


def _skimage(name):
    from skimage import data

    return getattr(data, name)()


def write_images(folder: Path) -> dict[str, Path]:
    """Real photos (scikit-image, matplotlib samples) and odd-but-valid images, as files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name, img, **kw):
        path = folder / name
        img.save(path, **kw)
        out[path.stem] = path

    save("astronaut.png", Image.fromarray(_skimage("astronaut")))
    save("coffee.jpg", Image.fromarray(_skimage("coffee")), quality=90)
    save("chelsea.png", Image.fromarray(_skimage("chelsea")))
    save("rocket.jpg", Image.fromarray(_skimage("rocket")), quality=85)
    save("camera_gray.png", Image.fromarray(_skimage("camera")))                     # mode L
    import matplotlib.cbook as cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        save("grace_hopper.jpg", Image.open(f).copy(), quality=92)
    rng = np.random.default_rng(0)
    save("wide_strip.png", Image.fromarray(rng.integers(0, 255, (23, 900, 3), dtype=np.uint8)))   # 1:39
    save("tall_strip.png", Image.fromarray(rng.integers(0, 255, (700, 9, 3), dtype=np.uint8)))    # 78:1
    rgba = np.concatenate([_skimage("chelsea")[:200, :300], rng.integers(0, 255, (200, 300, 1), dtype=np.uint8)], -1)
    save("rgba.png", Image.fromarray(rgba))
    save("palette.png", Image.fromarray(_skimage("astronaut")).convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    sixteen = (rng.integers(0, 65535, (120, 90), dtype=np.uint16))
    save("gray16.png", Image.fromarray(sixteen))  # 16-bit PNG (mode I;16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    save("exif_rotated.jpg", Image.fromarray(_skimage("astronaut")[:, 100:400]), exif=exif.tobytes(), quality=90)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 60)))
    save("huge.png", Image.new("RGB", (10000, 10000), (250, 250, 250)), compress_level=1)
    return out


# 20 image/prompt pairs: real photos, odd aspect ratios and odd modes, one two-image prompt
PAIRS = [
    (["astronaut"], 0), (["coffee"], 1), (["chelsea"], 2), (["rocket"], 3), (["camera_gray"], 4),
    (["grace_hopper"], 1), (["wide_strip"], 0), (["tall_strip"], 2), (["rgba"], 3), (["palette"], 4),
    (["gray16"], 0), (["exif_rotated"], 1), (["one_pixel"], 2), (["huge"], 3), (["astronaut", "coffee"], 1),
    (["chelsea"], 0), (["grace_hopper"], 4), (["rocket"], 1), (["coffee"], 2), (["camera_gray", "rgba"], 0),
]


def open_for_hf(path: Path) -> Image.Image:
    """What a transformers user passes the processor for a file: EXIF orientation applied."""
    from PIL import ImageOps

    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):
    """transformers' own model class for the folder (any family) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    ip = getattr(processor, "image_processor", None)
    if ip is not None and not type(ip).__name__.endswith("Pil"):
        # torchvision is installed (the export-tv environment), so transformers picked its torchvision image
        # backend; the runtime reproduces the PIL one exactly (docs/processor_backends.json: how far the other is)
        from transformers import AutoImageProcessor

        processor.image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return model, processor


def hf_inputs(model_dir: str, paths: list[Path], prompt: str, images_kwargs: dict | None = None):
    _, processor = hf_model(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"} for _ in paths] + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [[open_for_hf(p) for p in paths]] if paths else None  # a text-only prompt
    return processor(text=text, images=images, return_tensors="pt", **(images_kwargs or {}))


def hf_generate(model_dir: str, paths: list[Path], prompt: str, max_new_tokens: int) -> list[int]:
    return list(_hf_generate(model_dir, tuple(str(p) for p in paths), prompt, max_new_tokens))


@functools.lru_cache(maxsize=None)
def _hf_generate(model_dir: str, paths: tuple, prompt: str, max_new_tokens: int) -> tuple:
    import torch

    model, _ = hf_model(model_dir)
    enc = hf_inputs(model_dir, [Path(p) for p in paths], prompt)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tuple(out[0, enc["input_ids"].shape[1]:].tolist())


def tiny_vocab_tokenizer():
    """A word-level tokenizer of ~60 tokens with all of SmolVLM's special tokens (for distribution tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dream_export.presets.smolvlm_tiny.architecture import SPECIAL_TOKENS

    words = ["[UNK]", "User", ":", "Assistant", "What", "color", "is", "the", "circle", "?", "red", "blue", "a", "it",
             "yes", "no", "square", "shape", "Describe", "image", "."]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   unk_token="[UNK]", pad_token="<|im_end|>",
                                   additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"])


def run_cli_json(capsys, argv) -> dict:
    """``dream-run ... --json`` in process: its exit code must be 0; the printed JSON object."""
    import json

    from runtime import cli

    capsys.readouterr()
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def path_to(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]


def assert_tree_rows_are_plain_steps(pipe, prompt: str, tokens, parents):
    """Verify ``tokens`` (a tree: ``parents``) after ``prompt`` in one call, then decode each node's root path one
    token at a time on a fresh decoder: logits and hidden states agree bit for bit. Then accept the path to the
    last leaf (the last chain) and check the next step against plain decoding of that path."""
    from runtime.chains import chains_of

    prefix = pipe.prompt_embeds(pipe.prepare([], prompt))
    tokens, parents = np.asarray(tokens), np.asarray(parents)
    dec = pipe.new_decoder()
    assert dec.tree_native
    pipe.step(dec, prefix)
    tree = dec.run_tree(pipe.embed(tokens)[None], parents)
    plain = {}
    for node in range(len(tokens)):
        ref = pipe.new_decoder()
        pipe.step(ref, prefix)
        for t in path_to(parents, node):
            out = pipe.step(ref, pipe.embed(tokens[t:t + 1])[None], logits="last")
        np.testing.assert_array_equal(tree["logits"][0, node], out["logits"][0, -1], err_msg=f"node {node}")
        np.testing.assert_array_equal(tree["hidden_states"][0, node], out["hidden_states"][0, -1], err_msg=f"node {node}")
        plain[node] = ref
    rows, _, _ = chains_of(parents)
    leaf = int(rows[-1, -1])
    accepted = path_to(parents, leaf)
    dec.commit(accepted)
    assert dec.length == prefix.shape[1] + len(accepted)
    nxt = pipe.embed(tokens[:1])[None]
    np.testing.assert_array_equal(pipe.step(dec, nxt)["logits"], pipe.step(plain[leaf], nxt)["logits"])


def run_decoder_calls(dec, pipe, calls, seed=2):
    """Feed the same call sequence (q, accepted rows, truncate-to) to a decoder; return every output."""
    rng = np.random.default_rng(seed)
    H = int(pipe.text["hidden_size"])
    outs = []
    for q, rows, cut in calls:
        p = dec.length
        emb = (rng.standard_normal((1, q, H)) * 0.5).astype(np.float32)
        mask = np.zeros((1, 1, q, p + q), np.float32)
        mask[0, 0, :, p:] = np.triu(np.full((q, q), pipe.mask_min, np.float32), 1)
        outs.append(dec.run(emb, mask, np.arange(p, p + q)))
        dec.commit(rows)
        if cut is not None:
            dec.truncate(cut)
    return outs
