"""Speculative sampling keeps the target's distribution: chi-square tests on a tiny-vocabulary target."""

import numpy as np
import pytest
from scipy.stats import chisquare

from runtime.pipeline import Pipeline
from runtime.sampling import SamplingConfig, probabilities
from runtime.speculative import SpeculativeDecoder
from runtime.tree import TreeSpec

pytestmark = pytest.mark.slow  # sampling statistics over many draws: the full suite runs it, the fast lane does not


@pytest.fixture(scope="module")
def tiny_vocab_bundle(tmp_path_factory):
    import torch

    from dream_export.drafter.model import DrafterConfig, DreamDrafter
    from dream_export.export.exporter import ExportOptions, export_bundle, load_target
    from dream_export.presets.smolvlm_tiny.architecture import TinyVLMSpec, build_tiny_vlm
    from helpers import tiny_vocab_tokenizer

    root = tmp_path_factory.mktemp("tinyvocab")
    spec = TinyVLMSpec(text_layers=2, heads=4, kv_heads=2, image_splitting=False, init_std=0.25, seed=5)
    model_dir = build_tiny_vlm(root / "model", spec, tokenizer=tiny_vocab_tokenizer())
    model, processor = load_target(str(model_dir))
    assert model.config.text_config.vocab_size < 70
    torch.manual_seed(1)
    drafter = DreamDrafter(DrafterConfig.for_target(model.config.text_config), model.lm_head.weight)
    with torch.no_grad():
        drafter.cross.attn_gate.fill_(0.8)
    drafter.save(root / "drafter")
    return export_bundle(model, processor, {"model": "tinyvocab"},
                         ExportOptions(out=root / "bundle", drafter=root / "drafter", tree=TreeSpec(6, 3, 3)), quiet=True)


def _pool(counts, expected, min_expected=5.0):
    """Merge bins with small expected counts so the chi-square approximation holds."""
    order = np.argsort(expected)
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_o += counts[i]
        acc_e += expected[i]
        if acc_e >= min_expected:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        obs[-1] += acc_o
        exp[-1] += acc_e
    return np.array(obs), np.array(exp)


CASES = [(unrolled, t, p, 0) for unrolled in (False, True) for t, p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.9))]
CASES += [(False, 1.0, 1.0, 4), (True, 0.7, 1.0, 4)]  # with prompt lookup: copied tokens among the drafted ones


@pytest.mark.parametrize("unrolled,temperature,top_p,lookup", CASES,
                         ids=lambda v: str(v) if not isinstance(v, bool) else ("unrolled" if v else "stepwise"))
def test_first_and_second_token_distributions(tiny_vocab_bundle, images, temperature, top_p, unrolled, lookup):
    pipe = Pipeline.from_bundle(tiny_vocab_bundle)
    cfg = SamplingConfig(temperature, top_p, seed=0)
    rng = np.random.default_rng(1234)
    prep = pipe.prepare([str(images["coffee"])], "What color is the circle?")
    embeds = pipe.prompt_embeds(prep)
    spec = SpeculativeDecoder(pipe, TreeSpec(6, 3, 3, lookup), cfg, rng, unrolled=unrolled)
    copied = []
    if lookup:
        original = spec._with_lookup

        def record(tree, n):
            out = original(tree, n)
            copied.append(len(out.tokens) > len(tree.tokens) or not np.array_equal(out.scores, tree.scores))
            return out

        spec._with_lookup = record
    root = spec.start(embeds, prep.input_ids)
    saved = spec.snapshot()

    # exact target distributions: p1 = next token after the root, p2 = the token after that (marginal)
    plain = pipe.new_decoder()
    pipe.step(plain, embeds)
    base = plain.length
    logits1 = pipe.step(plain, pipe.embed(np.array([root]))[None])["logits"][0, -1]
    p1 = probabilities(logits1, cfg)
    p2 = np.zeros_like(p1)
    for t in np.flatnonzero(p1):
        plain.truncate(base + 1)
        p2 += p1[t] * probabilities(pipe.step(plain, pipe.embed(np.array([t]))[None])["logits"][0, -1], cfg)

    draws = 2500
    first = np.zeros(len(p1))
    second = np.zeros(len(p1))
    accepted = 0
    for _ in range(draws):
        spec.restore(saved)
        tokens = spec.step().tokens
        accepted += len(tokens) - 1
        if len(tokens) < 2:
            tokens = tokens + spec.step().tokens
        first[tokens[0]] += 1
        second[tokens[1]] += 1
    assert accepted > draws // 10  # drafts were really accepted, so the rejection path was exercised
    if lookup:
        assert sum(copied) > len(copied) // 2  # the lookup chain really changed most trees
    assert first[p1 == 0].sum() == 0 and second[p2 == 0].sum() == 0  # nothing outside the nucleus
    for counts, p in ((first, p1), (second, p2)):
        obs, exp = _pool(counts[p > 0], p[p > 0] * draws)
        assert chisquare(obs, exp).pvalue > 1e-3
