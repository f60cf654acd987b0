import os
from pathlib import Path

import pytest

from dream_export.presets.smolvlm_tiny.architecture import TinyVLMSpec

# Tiny SmolVLM configs built offline: image splitting on (multi-head), grouped-query attention with
# splitting off and tied embeddings, and the vision layouts (tile, patch, pixel shuffle) of the real checkpoints.
CONFIGS = {
    "split_mha": TinyVLMSpec(text_layers=3, heads=4, kv_heads=4, image_splitting=True, init_std=0.1, seed=1, max_positions=1024),
    "gqa_nosplit": TinyVLMSpec(text_layers=3, heads=4, kv_heads=2, image_splitting=False, tie_embeddings=True,
                               init_std=0.1, seed=2, max_positions=1024),
    # the vision layouts of the real checkpoints, scaled down: SmolVLM-Instruct (2B) has 384-px tiles,
    # 14-px patches and pixel shuffle x3; SmolVLM-256M/500M 512-px tiles, 16-px patches and x4
    "layout_2b": TinyVLMSpec(text_layers=2, heads=4, kv_heads=2, tile=84, patch=14, scale_factor=3, longest_edge=168,
                             init_std=0.1, seed=4, max_positions=1024),
    "layout_256m": TinyVLMSpec(text_layers=2, heads=4, kv_heads=2, tile=128, patch=16, scale_factor=4, longest_edge=256,
                               init_std=0.1, seed=5, max_positions=1024),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_store(tmp_path_factory):
    os.environ["DREAM_EXPORT_HOME"] = str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    import helpers

    return helpers.write_images(tmp_path_factory.mktemp("images"))


class Zoo:
    def __init__(self, root: Path):
        self.root = root
        self._built = {}

    def get(self, name: str) -> tuple[Path, Path]:
        """(model folder, bundle folder) for a named config, built and exported once per session."""
        if name not in self._built:
            from dream_export.export.exporter import ExportOptions, export_bundle, load_target
            from dream_export.presets.smolvlm_tiny.architecture import build_tiny_vlm

            model_dir = build_tiny_vlm(self.root / name / "model", CONFIGS[name])
            model, processor = load_target(str(model_dir))
            bundle = export_bundle(model, processor, {"model": name}, ExportOptions(out=self.root / name / "bundle"), quiet=True)
            self._built[name] = (model_dir, bundle)
        return self._built[name]


    def with_drafter(self, name: str, kind: str) -> tuple[Path, Path]:
        """(model folder, bundle with a drafter): kind 'random' (gates open, so memory and masks matter)
        or 'copy' (blocks and gates zeroed: it predicts from the token's own embedding, which a tied,
        repetitive random target often agrees with, so deep acceptance paths get exercised)."""
        key = f"{name}+{kind}"
        if key not in self._built:
            import torch

            from dream_export.drafter.model import DrafterConfig, DreamDrafter
            from dream_export.export.exporter import ExportOptions, export_bundle, load_target
            from runtime.tree import TreeSpec

            model_dir, _ = self.get(name)
            model, processor = load_target(str(model_dir))
            cfg = DrafterConfig.for_target(model.config.text_config, arch="concat" if kind == "concat" else "dream")
            torch.manual_seed(sum(map(ord, key)))
            from dream_export.drafter.model import build_drafter

            drafter = build_drafter(cfg, model.lm_head.weight)
            with torch.no_grad():
                if kind == "concat":
                    pass
                elif kind == "random":
                    drafter.cross.attn_gate.fill_(0.8)
                    drafter.cross.mlp_gate.fill_(0.8)
                else:
                    for block in (drafter.block0, drafter.block2):
                        block.self_attn.o_proj.weight.zero_()
                        block.mlp.down_proj.weight.zero_()
            ddir = self.root / key / "drafter"
            drafter.save(ddir)
            bundle = export_bundle(model, processor, {"model": key},
                                   ExportOptions(out=self.root / key / "bundle", drafter=ddir, tree=TreeSpec(8, 3, 2)),
                                   quiet=True)
            self._built[key] = (model_dir, bundle, ddir)
        return self._built[key][:2]

    def with_tree(self, name: str, kind: str, tree) -> tuple[Path, Path]:
        """The with_drafter bundle, copied, with its one-call draft graph re-exported for ``tree``'s D and K."""
        import shutil

        from dream_export.export.exporter import load_target, set_draft_tree

        key = f"{name}+{kind}@{tree.total_tokens},{tree.depth},{tree.top_k}"
        if key not in self._built:
            model_dir, bundle = self.with_drafter(name, kind)
            ddir = self._built[f"{name}+{kind}"][2]
            dst = self.root / key / "bundle"
            shutil.copytree(bundle, dst)
            model, processor = load_target(str(model_dir))
            set_draft_tree(dst, model, processor, ddir, tree)
            self._built[key] = (model_dir, dst)
        return self._built[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model folder, bundle) of the built-in smolvlm-tiny with its shipped drafter, exported once per session."""
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target
    from dream_export.presets import shipped_defaults
    from dream_export.presets.smolvlm_tiny import MODEL_DIR, ensure_smolvlm_tiny

    path = ensure_smolvlm_tiny()
    assert path == MODEL_DIR and (MODEL_DIR / "model.safetensors").is_file()
    shipped = shipped_defaults(path)
    model, processor = load_target(str(path))
    bundle = export_bundle(model, processor, {"model": "smolvlm-tiny"},
                           ExportOptions(out=tmp_path_factory.mktemp("tiny") / "bundle", drafter=shipped.folder,
                                         tree=shipped.tree), quiet=True)
    return path, bundle


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("zoo"))

CONFIGS["tied_loop"] = TinyVLMSpec(text_layers=2, heads=4, kv_heads=2, image_splitting=True, tie_embeddings=True,
                                   init_std=0.02, seed=4, max_positions=1024)  # random weights that repeat themselves
CONFIGS["learnable"] = TinyVLMSpec(text_layers=2, heads=4, kv_heads=2, image_splitting=False, init_std=0.1, seed=7,
                                   max_positions=512)  # peaky random target: a drafter can learn part of it
CONFIGS["ctx_small"] = TinyVLMSpec(text_layers=2, heads=4, kv_heads=2, image_splitting=False, init_std=0.1, seed=3,
                                   max_positions=96)
