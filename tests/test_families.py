"""VLM families beyond SmolVLM (issue 12), each through its adapter only: the exporter core and the runtime never
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
from runtime.pipeline import Pipeline
from runtime.tree import TreeSpec

MAX_NEW = 20


def _llava(layout):
    from dream_export.presets.tiny_llava import TinyLlavaSpec, build_tiny_llava

    spec = {"clip336like": TinyLlavaSpec(),  # LLaVA-1.5: layer -2, CLS dropped, shortest edge then centre crop
            "full_cls": TinyLlavaSpec(image_size=48, patch=8, shortest_edge=48, feature_layer=-1, select_strategy="full",
                                      text_layers=3, kv_heads=4, seed=1)}[layout]
    return lambda folder: build_tiny_llava(folder, spec)


def _llava_next(layout):
    from dream_export.presets.tiny_llava import TinyLlavaNextSpec, build_tiny_llava_next

    spec = {"anyres": TinyLlavaNextSpec(),  # LLaVA-1.6 layout: 1x2, 2x1, 2x2, 1x3 grids of the tower's square
            "anyres_p8": TinyLlavaNextSpec(image_size=48, patch=8, pinpoints=((1, 2), (2, 2), (3, 1)), text_layers=3,
                                           kv_heads=4, seed=2)}[layout]
    return lambda folder: build_tiny_llava_next(folder, spec)


# family -> {layout: builder(folder) -> model folder}; a registered family without an entry fails a test below
TEST_MODELS = {
    "llava": {"clip336like": _llava("clip336like"), "full_cls": _llava("full_cls")},
    "llava_next": {"anyres": _llava_next("anyres"), "anyres_p8": _llava_next("anyres_p8")},
    "idefics3": {},  # SmolVLM: tests/conftest.py's zoo (CONFIGS) and the built-in smolvlm-tiny
}
LAYOUTS = [(f, layout) for f, layouts in TEST_MODELS.items() for layout in layouts]
FIRST = [(f, next(iter(layouts))) for f, layouts in TEST_MODELS.items() if layouts]


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


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_greedy_ids_equal_transformers_on_20_pairs(families, images, capsys, family, layout):
    model_dir, bundle = families.get(family, layout)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["family"] == family
    pipe = Pipeline.from_bundle(bundle)
    for i, (names, prompt_idx) in enumerate(PAIRS):
        paths = [images[n] for n in names]
        prompt = PROMPTS[prompt_idx]
        if i % 5 == 0:  # through the CLI as a user runs it
            got = run_cli_json(capsys, [*map(str, paths), prompt, "--bundle", str(bundle), "--max-new-tokens", str(MAX_NEW),
                                     "--json"])["token_ids"]
        else:
            got = pipe.generate(paths, prompt, max_new_tokens=MAX_NEW).token_ids
        want = hf_generate(str(model_dir), paths, prompt, MAX_NEW)
        assert got == want, (names, prompt)


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_pixels_and_prompt_ids_equal_the_hf_processor(families, images, family, layout):
    model_dir, bundle = families.get(family, layout)
    pipe = Pipeline.from_bundle(bundle)
    for names in (["astronaut"], ["tall_strip"], ["wide_strip"], ["one_pixel"], ["rgba", "gray16"], ["huge"],
                  ["exif_rotated"]):
        paths = [images[n] for n in names]
        prep = pipe.prepare(paths, "Describe the image.")
        enc = hf_inputs(str(model_dir), paths, "Describe the image.")
        assert np.array_equal(prep.input_ids, enc["input_ids"][0].numpy()), names
        pixels = enc["pixel_values"].numpy()
        if pixels.ndim == 5:  # [images, patches (padded to the most), 3, S, S]
            pixels = np.concatenate([p[:len(t)] for p, t in zip(pixels, prep.tiles)])
        np.testing.assert_array_equal(np.concatenate(prep.tiles), pixels)


@pytest.mark.parametrize("family,layout", FIRST)
@pytest.mark.parametrize("drafter", ["random", "trained"])
@pytest.mark.parametrize("tree", [TreeSpec(8, 3, 2), TreeSpec(12, 4, 3)], ids=["tree8", "tree12"])
def test_speculative_equals_plain(families, images, family, layout, drafter, tree):
    _, bundle = families.get(family, layout, drafter, tree)
    pipe = Pipeline.from_bundle(bundle)
    for names, prompt_idx in PAIRS[:6] + [PAIRS[14]]:
        paths = [images[n] for n in names]
        plain = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=False)
        spec = pipe.generate(paths, PROMPTS[prompt_idx], max_new_tokens=MAX_NEW, speculative=True)
        assert spec.token_ids == plain.token_ids, names
    fused = Pipeline.from_bundle(bundle, fused="device")  # the GPU path's decoder, on host memory
    assert fused.generate([images["coffee"]], PROMPTS[1], max_new_tokens=MAX_NEW, speculative=True).token_ids == \
        pipe.generate([images["coffee"]], PROMPTS[1], max_new_tokens=MAX_NEW, speculative=False).token_ids


@pytest.mark.parametrize("family,layout", FIRST)
def test_text_only_and_unsupported_options(families, images, capsys, family, layout):
    model_dir, bundle = families.get(family, layout)
    got = run_cli_json(capsys, ["Tell me a story.", "--bundle", str(bundle), "--max-new-tokens", "12", "--json"])["token_ids"]
    assert got == hf_generate(str(model_dir), [], "Tell me a story.", 12)
    capsys.readouterr()
    assert cli.main([str(images["coffee"]), "Hi", "--bundle", str(bundle), "--image-splitting"]) == 2
    err = capsys.readouterr().err
    assert "no splitting" in err and err.count("\n") == 1
    assert cli.main([str(images["coffee"]), "Hi", "--bundle", str(bundle), "--longest-edge", "64"]) == 2
    assert "fixed size" in capsys.readouterr().err


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
