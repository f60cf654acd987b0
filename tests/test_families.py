"""VLM families beyond SmolVLM, each through its adapter only: the exporter core and the runtime never
name a family. Per family, two layouts built offline from transformers' own classes: dream-run --json greedy ids
== transformers ``generate`` on 20 image/prompt pairs (real photos, odd sizes, two-image prompts), the runtime's
pixels == the HF processor's, speculative == plain with a random and a briefly trained drafter on two trees, and
every registered family has a test model here."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import PAIRS, PROMPTS, hf_generate, hf_inputs, run_cli_json
from runtime import cli
from runtime.errors import InputError
from runtime.pipeline import Pipeline
from runtime.tree import TreeSpec

MAX_NEW = 20


def _llava(layout):
    from tiny_models.llava import TinyLlavaSpec, build_tiny_llava

    spec = {"clip336like": TinyLlavaSpec(),  # LLaVA-1.5: layer -2, CLS dropped, shortest edge then centre crop
            "full_cls": TinyLlavaSpec(image_size=48, patch=8, shortest_edge=48, feature_layer=-1, select_strategy="full",
                                      text_layers=3, kv_heads=4, seed=1)}[layout]
    return lambda folder: build_tiny_llava(folder, spec)


def _llava_next(layout):
    from tiny_models.llava import TinyLlavaNextSpec, build_tiny_llava_next

    spec = {"anyres": TinyLlavaNextSpec(),  # LLaVA-1.6 layout: 1x2, 2x1, 2x2, 1x3 grids of the tower's square
            "anyres_p8": TinyLlavaNextSpec(image_size=48, patch=8, pinpoints=((1, 2), (2, 2), (3, 1)), text_layers=3,
                                           kv_heads=4, seed=2)}[layout]
    return lambda folder: build_tiny_llava_next(folder, spec)


def _gemma3(layout):
    from tiny_models.gemma3 import TinyGemma3Spec, build_tiny_gemma3

    spec = {"window24": TinyGemma3Spec(),  # sliding, sliding, global, sliding; a 24-position window; 4 tokens per image
            "softcap_w16": TinyGemma3Spec(sliding_window=16, text_layers=3, kv_heads=4, final_logit_softcapping=5.0,
                                          layer_types=("full_attention", "sliding_attention", "sliding_attention"),
                                          image_size=64, patch=8, tokens_per_image=16, seed=1)}[layout]
    return lambda folder: build_tiny_gemma3(folder, spec)


def _smolvlm2(layout):
    from tiny_models.smolvlm2 import TinySmolVLM2Spec, build_tiny_smolvlm2

    spec = {"split": TinySmolVLM2Spec(),  # 32-px tiles, 8-px patches, pixel shuffle x2; videos at 1 fps, <= 6 frames
            "nosplit_x3": TinySmolVLM2Spec(image_splitting=False, tile=48, patch=8, scale_factor=3, longest_edge=96,
                                           text_layers=3, kv_heads=4, video_fps=2.0, video_max_frames=4,
                                           video_longest_edge=96, seed=1)}[layout]
    return lambda folder: build_tiny_smolvlm2(folder, spec)


def _pixtral(layout):
    from tiny_models.pixtral import TinyPixtralSpec, build_tiny_pixtral

    spec = {"p8_edge64": TinyPixtralSpec(),  # 8-px patches, images up to 64 px a side (8 x 8 patches), last layer
            "p16_edge80": TinyPixtralSpec(patch=16, longest_edge=80, feature_layer=-2, text_layers=3, kv_heads=4,
                                          seed=1)}[layout]
    return lambda folder: build_tiny_pixtral(folder, spec)


def _qwen2_5_vl(layout):
    from tiny_models.qwen2_5_vl import TinyQwen25VLSpec, build_tiny_qwen2_5_vl

    spec = {"p8_win2": TinyQwen25VLSpec(),  # 8-px patches, 2x2-token windows, block 1 full, <= 48 tokens per image
            "p6_win4": TinyQwen25VLSpec(patch=6, window_size=48, fullatt_blocks=(0,), heads=8, mrope_section=(1, 1, 2),
                                        max_tokens=40, text_layers=3, kv_heads=4, seed=1)}[layout]
    return lambda folder: build_tiny_qwen2_5_vl(folder, spec)


def _mistral3(layout):
    from tiny_models.pixtral import TinyPixtralSpec, build_tiny_pixtral

    spec = {"p8_merge2": TinyPixtralSpec(merge=2, longest_edge=96),  # 16-px tokens (2x2 patches of 8 px), up to 96 px
            "p6_merge3": TinyPixtralSpec(patch=6, merge=3, longest_edge=100, feature_layer=-2, text_layers=3,
                                         kv_heads=4, seed=2)}[layout]
    return lambda folder: build_tiny_pixtral(folder, spec)


# family -> {layout: builder(folder) -> model folder}; a registered family without an entry fails a test below
TEST_MODELS = {
    "llava": {"clip336like": _llava("clip336like"), "full_cls": _llava("full_cls")},
    "llava_next": {"anyres": _llava_next("anyres"), "anyres_p8": _llava_next("anyres_p8")},
    "gemma3": {"window24": _gemma3("window24"), "softcap_w16": _gemma3("softcap_w16")},
    "smolvlm2": {"split": _smolvlm2("split"), "nosplit_x3": _smolvlm2("nosplit_x3")},
    "pixtral": {"p8_edge64": _pixtral("p8_edge64"), "p16_edge80": _pixtral("p16_edge80")},
    "qwen2_5_vl": {"p8_win2": _qwen2_5_vl("p8_win2"), "p6_win4": _qwen2_5_vl("p6_win4")},
    "mistral3": {"p8_merge2": _mistral3("p8_merge2"), "p6_merge3": _mistral3("p6_merge3")},
    "idefics3": {},  # SmolVLM: tests/conftest.py's zoo (CONFIGS) and the built-in smolvlm-tiny
}
# families whose transformers processor cannot be built without torchvision (SmolVLM2, Qwen2.5-VL: a video processor
# is required; Pixtral, Mistral-Small-3.1: the processor is declared so): their tests run in the export-tv environment
# (tests/run_all.sh: pytest -m torchvision)
NEEDS_TORCHVISION = {"smolvlm2", "pixtral", "mistral3", "qwen2_5_vl"}


def _params(pairs):
    return [pytest.param(f, layout, marks=pytest.mark.torchvision) if f in NEEDS_TORCHVISION else (f, layout)
            for f, layout in pairs]


LAYOUTS = _params([(f, layout) for f, layouts in TEST_MODELS.items() for layout in layouts])
FIRST = _params([(f, next(iter(layouts))) for f, layouts in TEST_MODELS.items() if layouts])


class Families:
    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def get(self, family: str, layout: str, drafter: str | None = None, tree: TreeSpec | None = None):
        key = (family, layout, drafter, tree.to_json()["total_tokens"] if tree else None, tree.depth if tree else None)
        if key in self.built:
            return self.built[key]
        from dream_export.export.exporter import ExportOptions, export_bundle, load_target

        model_dir = self.root / family / layout / "model"
        if not model_dir.is_dir():
            TEST_MODELS[family][layout](model_dir)
        model, processor = load_target(str(model_dir))
        ddir = None
        if drafter == "random":
            ddir = self._random_drafter(model, self.root / family / layout / "random_drafter")
        elif drafter == "trained":
            ddir = self._trained_drafter(model_dir, self.root / family / layout / "trained")
        out = self.root / family / layout / f"bundle-{drafter}-{key[3]}-{key[4]}"
        bundle = export_bundle(model, processor, {"model": f"{family}-{layout}"},
                               ExportOptions(out=out, drafter=ddir, tree=tree), quiet=True)
        self.built[key] = (model_dir, bundle)
        return self.built[key]

    @staticmethod
    def _random_drafter(model, folder: Path) -> Path:
        import torch

        from dream_export.drafter.model import DrafterConfig, build_drafter

        if not (folder / "drafter_config.json").is_file():
            torch.manual_seed(5)
            d = build_drafter(DrafterConfig.for_target(model.config.text_config), model.lm_head.weight)
            with torch.no_grad():
                d.cross.attn_gate.fill_(0.8)
                d.cross.mlp_gate.fill_(0.8)
            d.save(folder)
        return folder

    @staticmethod
    def _trained_drafter(model_dir: Path, out: Path) -> Path:
        from dream_export.train.cli import main as train_main

        if not (out / "drafter" / "drafter_config.json").is_file():
            assert train_main(["--model", str(model_dir), "--data", "scenes:6", "--out", str(out), "--steps", "30",
                               "--batch", "2", "--heldout", "2", "--max-new-tokens", "12"]) in (0, None)
        return out / "drafter"


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return Families(tmp_path_factory.mktemp("families"))


def test_every_registered_family_has_a_test_model():
    from dream_export.targets.base import _ADAPTERS

    registered = {cls.family for cls in _ADAPTERS}
    assert registered == set(TEST_MODELS), f"families without a test model here: {registered - set(TEST_MODELS)}"
    for family, layouts in TEST_MODELS.items():
        assert family == "idefics3" or len(layouts) >= 2, family  # two layouts each (SmolVLM's live in the zoo)


def _hf_refuses(model_dir, paths, prompt) -> bool:
    """Whether transformers' processor refuses the image (Pixtral: a 78:1 strip fitted into the longest edge has a
    0-px side, and its resize fails)."""
    try:
        hf_inputs(str(model_dir), paths, prompt)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_greedy_ids_equal_transformers_on_20_pairs(families, images, capsys, family, layout):
    model_dir, bundle = families.get(family, layout)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["family"] == family
    pipe = Pipeline.from_bundle(bundle)
    for i, (names, prompt_idx) in enumerate(PAIRS):
        paths = [images[n] for n in names]
        prompt = PROMPTS[prompt_idx]
        if _hf_refuses(model_dir, paths, prompt):  # then the runtime says why in one line
            with pytest.raises(InputError, match="aspect ratio"):
                pipe.generate(paths, prompt, max_new_tokens=MAX_NEW)
            continue
        try:
            want = hf_generate(str(model_dir), paths, prompt, MAX_NEW)
        except RuntimeError as exc:
            # transformers' Mistral3 get_image_features squeezes a one-token image's features to a vector and then
            # fails to split them (the 1-px image: one 2x2 square): nothing to compare with; the runtime answers it
            assert family == "mistral3" and "split_with_sizes" in str(exc) and names == ["one_pixel"], exc
            assert pipe.generate(paths, prompt, max_new_tokens=MAX_NEW).token_ids
            continue
        if i % 5 == 0:  # through the CLI as a user runs it
            got = run_cli_json(capsys, [*map(str, paths), prompt, "--bundle", str(bundle), "--max-new-tokens", str(MAX_NEW),
                                     "--json"])["token_ids"]
        else:
            got = pipe.generate(paths, prompt, max_new_tokens=MAX_NEW).token_ids
        assert got == want, (names, prompt)


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_pixels_and_prompt_ids_equal_the_hf_processor(families, images, family, layout):
    model_dir, bundle = families.get(family, layout)
    pipe = Pipeline.from_bundle(bundle)
    for names in (["astronaut"], ["tall_strip"], ["wide_strip"], ["one_pixel"], ["rgba", "gray16"], ["huge"],
                  ["exif_rotated"]):
        paths = [images[n] for n in names]
        if _hf_refuses(model_dir, paths, "Describe the image."):
            with pytest.raises(InputError, match="aspect ratio"):
                pipe.prepare(paths, "Describe the image.")
            continue
        prep = pipe.prepare(paths, "Describe the image.")
        enc = hf_inputs(str(model_dir), paths, "Describe the image.")
        assert np.array_equal(prep.input_ids, enc["input_ids"][0].numpy()), names
        pixels = enc["pixel_values"].numpy()
        if "image_sizes" in enc and pixels.ndim == 4:
            # Pixtral: [images, 3, H, W] zero-padded to the largest; each image at its own size here
            sizes = [tuple(s) for s in enc["image_sizes"].tolist()]
            assert [t.shape[2:] for t in prep.tiles] == sizes, names
            for t, p, (h, w) in zip(prep.tiles, pixels, sizes):
                np.testing.assert_array_equal(t[0], p[:, :h, :w])
            continue
        if pixels.ndim == 5 and pixels.shape[:2] == (1, sum(len(t) for t in prep.tiles)):
            pixels = pixels[0]  # SmolVLM: [batch, every tile of every image, 3, S, S]
        elif pixels.ndim == 5:  # LLaVA-NeXT: [images, patches (padded to the most), 3, S, S]
            pixels = np.concatenate([p[:len(t)] for p, t in zip(pixels, prep.tiles)])
        np.testing.assert_array_equal(np.concatenate(prep.tiles), pixels)


@pytest.mark.parametrize("family,layout", FIRST)
@pytest.mark.parametrize("drafter", ["random", "trained"])
@pytest.mark.parametrize("tree", [TreeSpec(8, 3, 2), TreeSpec(12, 4, 3)], ids=["tree8", "tree12"])
def test_speculative_equals_plain(families, images, family, layout, drafter, tree):
    _, bundle = families.get(family, layout, drafter, tree)
    pipe = Pipeline.from_bundle(bundle)
    for names, prompt_idx in PAIRS:  # the 20 pairs of the equality test above
        paths = [images[n] for n in names]
        try:
            plain = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=False)
        except InputError:  # an image the family refuses (Pixtral: the 1:78 strip), as the equality test checks
            continue
        spec = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=True)
        assert spec.token_ids == plain.token_ids, names
    if family == "smolvlm2":  # and on short generated videos
        for video in _videos(families.root).values():
            plain = pipe.generate([video], PROMPTS[1], max_new_tokens=MAX_NEW, speculative=False)
            assert pipe.generate([video], PROMPTS[1], max_new_tokens=MAX_NEW, speculative=True).token_ids == plain.token_ids
    fused = Pipeline.from_bundle(bundle, fused="device")  # the GPU path's decoder, on host memory
    assert fused.generate([images["coffee"]], PROMPTS[1], max_new_tokens=MAX_NEW, speculative=True).token_ids == \
        pipe.generate([images["coffee"]], PROMPTS[1], max_new_tokens=MAX_NEW, speculative=False).token_ids


@pytest.mark.parametrize("family,layout", FIRST)
def test_text_only_and_unsupported_options(families, images, capsys, family, layout):
    model_dir, bundle = families.get(family, layout)
    got = run_cli_json(capsys, ["Tell me a story.", "--bundle", str(bundle), "--max-new-tokens", "12", "--json"])["token_ids"]
    assert got == hf_generate(str(model_dir), [], "Tell me a story.", 12)
    capsys.readouterr()
    if json.loads((bundle / "manifest.json").read_text())["preprocessing"]["kind"] == "idefics3":
        return  # SmolVLM's image options are supported (tests/test_inputs.py)
    assert cli.main([str(images["coffee"]), "Hi", "--bundle", str(bundle), "--image-splitting"]) == 2
    err = capsys.readouterr().err
    assert "no splitting" in err and err.count("\n") == 1
    if family in ("pixtral", "mistral3"):  # images at their own size: a lower longest edge is an option, as in the processor
        pipe = Pipeline.from_bundle(bundle)
        small = pipe.prepare([images["coffee"]], "Hi", longest_edge=24)
        enc = hf_inputs(str(model_dir), [images["coffee"]], "Hi", images_kwargs={"size": {"longest_edge": 24}})
        assert np.array_equal(small.input_ids, enc["input_ids"][0].numpy())
        assert len(small.input_ids) < len(pipe.prepare([images["coffee"]], "Hi").input_ids)
        assert cli.main([str(images["coffee"]), "Hi", "--bundle", str(bundle), "--longest-edge", "100000"]) == 2
        assert "longest_edge" in capsys.readouterr().err
        return
    assert cli.main([str(images["coffee"]), "Hi", "--bundle", str(bundle), "--longest-edge", "64"]) == 2
    err = capsys.readouterr().err  # a fixed size (CLIP-style) or a pixel budget (Qwen2.5-VL): refused in one line
    assert "longest_edge" in err and ("fixed size" in err or "pixel budget" in err) and err.count("\n") == 1


@pytest.mark.parametrize("family,layout", FIRST)
def test_a_drafter_in_the_released_dream_layout(families, images, tmp_path, family, layout):
    """The only released DREAM drafter is for LLaVA-1.6 (LLaVA-NeXT): a tiny drafter saved under its key names and
    config.json loads through --drafter and decodes lossless against the LLaVA targets."""
    import torch
    from safetensors.torch import save_file

    from dream_export.cli import main as export_main
    from dream_export.drafter.model import DrafterConfig, DreamDrafter
    from dream_export.drafter.released import to_theirs
    from dream_export.export.exporter import load_target

    model_dir, _ = families.get(family, layout)
    model, _ = load_target(str(model_dir))
    cfg = DrafterConfig.for_target(model.config.text_config)
    torch.manual_seed(3)
    d = DreamDrafter(cfg, model.lm_head.weight.detach().clone())
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rel = tmp_path / "released"
    rel.mkdir()
    save_file({to_theirs(k): v.contiguous() for k, v in d.state_dict().items() if "lm_head" not in k and "embed" not in k},
              rel / "model.safetensors")
    (rel / "config.json").write_text(json.dumps({
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta, "hidden_act": "silu"}))
    out = tmp_path / "bundle"
    assert export_main(["--model", str(model_dir), "--drafter", str(rel), "--out", str(out), "--tree", "8,3,2", "--quiet"]) == 0
    pipe = Pipeline.from_bundle(out)
    for names, prompt_idx in (PAIRS[0], PAIRS[14]):
        paths = [images[n] for n in names]
        spec = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=True)
        assert spec.token_ids == pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=False).token_ids
        assert spec.accept_lengths


@pytest.mark.parametrize("layout", list(TEST_MODELS["gemma3"]))
def test_gemma3_rules_are_exercised(families, images, layout):
    """The Gemma 3 test models are ones where the sliding window, the image blocks' bidirectional attention and the
    embedding scale change the answers, so the equality tests above could fail if any rule were dropped."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from helpers import hf_inputs, hf_model

    model_dir, bundle = families.get("gemma3", layout)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["text"]["image_attention"] == "bidirectional" and manifest["text"]["embed_scale"] == 8.0
    assert any(manifest["text"]["attention_windows"]) and None in manifest["text"]["attention_windows"]
    assert "decoder_ort_cpu" not in manifest["graphs"]  # GroupQueryAttention is causal-only: no image blocks
    pairs = [(names, PROMPTS[i]) for names, i in PAIRS[:8]]
    # image tokens see their whole block: a causal prompt mask answers differently on some pair
    pipe = Pipeline.from_bundle(bundle)
    causal = Pipeline.from_bundle(bundle)
    causal.image_attention = "causal"
    assert any(pipe.generate([images[n] for n in names], prompt, max_new_tokens=MAX_NEW).token_ids
               != causal.generate([images[n] for n in names], prompt, max_new_tokens=MAX_NEW).token_ids
               for names, prompt in pairs)
    # the window: the same model without it (transformers' own generate) answers differently on some pair
    model, _ = hf_model(str(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    config.text_config.sliding_window = 4096
    wide = AutoModelForImageTextToText.from_pretrained(model_dir, config=config).eval()
    differs = False
    for names, prompt in pairs:
        enc = hf_inputs(str(model_dir), [images[n] for n in names], prompt)
        with torch.no_grad():
            a = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
            b = wide.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        differs |= not torch.equal(a, b)
    assert differs
    # the embedding scale: the runtime's rows are sqrt(hidden) x the stored matrix, as the model's embedding layer
    ids = np.array([3, 5, 8])
    with torch.no_grad():
        want = model.get_input_embeddings()(torch.tensor(ids)).numpy()
    np.testing.assert_array_equal(pipe.embed(ids), want)


@pytest.mark.torchvision
@pytest.mark.parametrize("family,layout", [(f, layout) for f in ("pixtral", "mistral3", "qwen2_5_vl")
                                           for layout in TEST_MODELS[f]])
def test_images_at_their_own_size_fit_the_tensorrt_profile(families, images, family, layout):
    """Pixtral's and Qwen2.5-VL's vision graphs take one image of its own size per call: the calls prompts make (odd
    sizes, two images) each fit the TensorRT plan's vision profile, which stops at the family's largest image;
    Pixtral's prompt spells each image's grid out ([IMG] x cols + [IMG_BREAK] per row, [IMG_END] last)."""
    from runtime.backends.engine_plan import Plan

    _, bundle = families.get(family, layout)
    pipe = Pipeline.from_bundle(bundle)
    pre = pipe.bundle.manifest["preprocessing"]
    assert pre["vision_call"] == "per_image"
    plan = Plan.from_manifest(pipe.bundle.manifest)
    calls = []
    run = pipe.backend.run
    pipe.backend.run = lambda graph, feeds, outputs=None: (calls.append((graph, {k: v.shape for k, v in feeds.items()})),
                                                           run(graph, feeds, outputs))[1]
    for names in (["astronaut", "wide_strip"], ["one_pixel"], ["huge"], ["exif_rotated", "gray16"]):
        prep = pipe.prepare([images[n] for n in names], "Describe the image.")
        pipe.vision(prep.tiles, prep.images)
        if family in ("pixtral", "mistral3"):
            text = pipe.tokenizer.decode(prep.input_ids.tolist(), skip_special_tokens=False).replace(" ", "")
            for img in prep.images:
                row = pre["image_token"] * img.cols
                assert (row + pre["image_break_token"]) * (img.rows - 1) + row + pre["image_end_token"] in text
    sizes = set()
    for graph, shapes in calls:
        assert graph == "vision" and plan.profile_for("vision", shapes).name == "image"
        sizes.add(shapes["pixel_values"])
    assert len(sizes) >= 4  # images at their own sizes, not one square
    dim, (_, _, most) = next((d, r) for d, r in plan.profiles["vision"][0].dims.items() if d != "tiles")
    too_big = {name: tuple(most + 1 if d == dim else v for d, v in zip(spec["shape"], shape))
               for spec in plan.graph_inputs("vision") for name, shape in calls[0][1].items() if spec["name"] == name}
    with pytest.raises(ValueError, match="no profile serves"):
        plan.profile_for("vision", too_big)


@pytest.mark.torchvision
@pytest.mark.parametrize("layout", list(TEST_MODELS["qwen2_5_vl"]))
def test_qwen2_5_vl_positions_are_transformers(families, images, monkeypatch, layout):
    """The runtime's M-RoPE positions (three axes; image tokens by row and column; text after an image at start +
    max(rows, cols)) == transformers' ``get_rope_index`` on one-, two- and no-image prompts, and the rule matters:
    sequence indices as positions answer differently on some pair."""
    import torch

    import runtime.rope
    from helpers import hf_model

    model_dir, bundle = families.get("qwen2_5_vl", layout)
    model, _ = hf_model(str(model_dir))
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.bundle.manifest["text"]["rope_axes"] == 3
    deltas, axes_apart = [], False
    for names in (["astronaut"], ["astronaut", "coffee"], ["wide_strip"], ["one_pixel", "tall_strip"], []):
        paths = [images[n] for n in names]
        prep = pipe.prepare(paths, "Describe the image.")
        enc = hf_inputs(str(model_dir), paths, "Describe the image.")
        with torch.no_grad():
            want, delta = model.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                                     image_grid_thw=enc.get("image_grid_thw"))
        table, d = runtime.rope.mrope_table(prep.input_ids, pipe.image_token_id,
                                            [pipe.pre.token_grid(i) for i in prep.images])
        np.testing.assert_array_equal(table, want[:, 0].numpy())
        assert d == int(delta[0, 0]), names
        deltas.append(d)
        axes_apart |= not np.array_equal(table[1], table[2])
    assert min(deltas) < 0 and axes_apart  # an image spans fewer positions than tokens; its axes differ
    pairs = [([images[n] for n in names], PROMPTS[i]) for names, i in PAIRS[:8]]
    right = [pipe.generate(p, q, max_new_tokens=MAX_NEW).token_ids for p, q in pairs]
    monkeypatch.setattr(runtime.rope, "mrope_table",
                        lambda ids, image_token_id, grids: (np.repeat(np.arange(len(ids))[None], 3, 0), 0))
    flat = [pipe.generate(p, q, max_new_tokens=MAX_NEW).token_ids for p, q in pairs]
    assert flat != right


def _videos(root: Path) -> dict[str, Path]:
    """Two short generated MP4s (PyAV): a 5 s pan over a photo at 8 fps, and a 12 s scene sequence at 4 fps long
    enough for the sampler to skip a second at each end."""
    import av
    import skimage.data

    from dream_export.scenes import random_scene

    out = {"pan": root / "videos" / "pan.mp4", "scenes": root / "videos" / "scenes.mp4"}
    if all(p.is_file() for p in out.values()):
        return out
    out["pan"].parent.mkdir(parents=True, exist_ok=True)
    photo = skimage.data.astronaut()
    rng = np.random.default_rng(11)
    scenes = [np.array(random_scene(rng, min_side=120, max_side=200).render().convert("RGB").resize((176, 112)))
              for _ in range(6)]
    for name, fps, frames in (("pan", 8, [photo[i * 5:i * 5 + 96, i * 4:i * 4 + 160] for i in range(40)]),
                              ("scenes", 4, [scenes[i // 8] for i in range(48)])):
        with av.open(str(out[name]), "w") as c:
            stream = c.add_stream("mpeg4", rate=fps)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for f in frames:
                for pkt in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(pkt)
            for pkt in stream.encode():
                c.mux(pkt)
    return out


@pytest.mark.torchvision
@pytest.mark.parametrize("layout", list(TEST_MODELS["smolvlm2"]))
def test_smolvlm2_video_matches_transformers(families, capsys, layout):
    """A video through dream-run: the prompt (frame count in words, duration, per-frame timestamps, image tokens)
    == transformers' SmolVLM processor's ids; frames within a few 8-bit levels of its torchvision-resized frames (the
    runtime resizes with PIL); greedy ids == transformers ``generate`` given the same frames."""
    import torch
    from transformers.video_utils import load_video

    from helpers import hf_model

    model_dir, bundle = families.get("smolvlm2", layout)
    model, processor = hf_model(str(model_dir))
    pipe = Pipeline.from_bundle(bundle)
    for name, path in _videos(families.root).items():
        prompt = "What happens in the video?"
        frames, meta = load_video(str(path), backend="pyav")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        enc = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), videos=[frames],
                        video_metadata=[meta], return_tensors="pt")
        prep = pipe.prepare([path], prompt)
        assert np.array_equal(prep.input_ids, enc["input_ids"][0].numpy()), name
        ours = np.concatenate(prep.tiles)
        theirs = enc["pixel_values"][0].numpy()
        assert ours.shape == theirs.shape, name
        # two resizes, each rounded to 8 bits by PIL here and by torchvision there: a level or two apart at most
        level = 2 / 255  # one 8-bit level after normalising with std 0.5
        diff = np.abs(ours - theirs)
        assert diff.max() <= 3 * level * 1.01 and diff.mean() <= 0.25 * level, (name, diff.max() / level)
        got = run_cli_json(capsys, [str(path), prompt, "--bundle", str(bundle), "--max-new-tokens", str(MAX_NEW),
                                    "--json"])["token_ids"]
        same_frames = {**enc, "pixel_values": torch.from_numpy(ours)[None]}
        with torch.no_grad():
            want = model.generate(**same_frames, max_new_tokens=MAX_NEW, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert got == want.tolist(), name


def test_video_input_errors(zoo, capsys, tmp_path):
    """A video for an image-only model: one clear line."""
    _, bundle = zoo.get("gqa_nosplit")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really a video")
    capsys.readouterr()
    assert cli.main([str(clip), "What happens?", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "takes images, not videos" in err and err.count("\n") == 1


@pytest.mark.torchvision
def test_video_without_pyav_says_how_to_install(families, capsys, monkeypatch):
    import sys

    _, bundle = families.get("smolvlm2", "split")
    video = _videos(families.root)["pan"]
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert cli.main([str(video), "What happens?", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "pip install av" in err and err.count("\n") == 1


def test_a_torchvision_family_names_the_environment_it_needs(zoo, tmp_path, capsys):
    """Here (no torchvision), exporting SmolVLM2 fails with one line naming the export-tv environment: its processor
    cannot be built. The folder is a SmolVLM2 checkpoint's layout made from the zoo's SmolVLM one (same
    architecture; the processor config gains SmolVLM2's video processor)."""
    import importlib.util
    import shutil

    from dream_export.cli import main as export_main

    assert importlib.util.find_spec("torchvision") is None  # the main environment (torchvision runs use .venv-tv)
    model_dir, _ = zoo.get("gqa_nosplit")
    folder = tmp_path / "smolvlm2"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="smolvlm", architectures=["SmolVLMForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = json.loads((folder / "processor_config.json").read_text())
    proc["processor_class"] = "SmolVLMProcessor"
    proc["image_processor"]["image_processor_type"] = "SmolVLMImageProcessor"
    proc["video_processor"] = {"video_processor_type": "SmolVLMVideoProcessor", "do_sample_frames": True,
                               "video_sampling": {"fps": 1.0, "max_frames": 4, "video_size": {"longest_edge": 64}}}
    (folder / "processor_config.json").write_text(json.dumps(proc))
    capsys.readouterr()
    assert export_main(["--model", str(folder), "--out", str(tmp_path / "b"), "--no-drafter", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "torchvision" in err and "export-tv" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "b").exists()
