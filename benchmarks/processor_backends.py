"""How far transformers' torchvision ("fast") image processor is from its PIL one, which the runtime reproduces
exactly (the runtime is torch-free, so it cannot use torchvision's). Needs torchvision, so it runs outside the
project's CPU-torch environment, e.g.:

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        transformers==5.24.0 tokenizers pillow scikit-image
    PYTHONPATH=. /tmp/tvenv/bin/python benchmarks/processor_backends.py [--out docs/processor_backends.json]

For SmolVLM (Idefics3) on real photos and generated scenes at odd sizes: the pixel difference between the two
backends' ``pixel_values`` and whether smolvlm-tiny's greedy answer (transformers ``generate``) stays the same."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _images():
    import skimage.data
    from PIL import Image

    from dream_export.scenes import random_scene

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry",
                 "retina", "page"):
        arr = getattr(skimage.data, name)()
        out[name] = Image.fromarray(arr).convert("RGB")
    rng = np.random.default_rng(7)
    for i in range(10):
        out[f"scene{i}"] = random_scene(rng, min_side=60, max_side=400).render().convert("RGB")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dream_export.presets.smolvlm_tiny import ensure_smolvlm_tiny

    folder = str(ensure_smolvlm_tiny())
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    procs = {"pil": AutoProcessor.from_pretrained(folder, backend="pil"),
             "torchvision": AutoProcessor.from_pretrained(folder, backend="torchvision")}
    kinds = {k: type(p.image_processor).__name__ for k, p in procs.items()}
    rows = []
    for name, img in _images().items():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        enc = {}
        for k, proc in procs.items():
            text = proc.apply_chat_template(messages, add_generation_prompt=True)
            enc[k] = proc(text=text, images=[[img]], return_tensors="pt")
        a, b = enc["pil"]["pixel_values"].numpy(), enc["torchvision"]["pixel_values"].numpy()
        row = {"image": name, "size": list(img.size), "same_shape": a.shape == b.shape,
               "same_prompt_ids": bool(torch.equal(enc["pil"]["input_ids"], enc["torchvision"]["input_ids"]))}
        if a.shape == b.shape:
            d = np.abs(a - b)
            row.update(max_abs=float(d.max()), mean_abs=float(d.mean()), frac_differ=float((d > 0).mean()),
                       max_abs_in_levels=float(d.max() / (2 / 255)))  # normalised with std 0.5: 1 level = 2/255
        ids = {}
        with torch.no_grad():
            for k, e in enc.items():
                out = model.generate(**e, max_new_tokens=args.max_new_tokens, do_sample=False)
                ids[k] = out[0, e["input_ids"].shape[1]:].tolist()
        n = min(len(ids["pil"]), len(ids["torchvision"]))
        agree = next((i for i in range(n) if ids["pil"][i] != ids["torchvision"][i]), n)
        row.update(same_answer=ids["pil"] == ids["torchvision"], agreeing_prefix=agree, answer_len=len(ids["pil"]))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    comparable = [r for r in rows if r["same_shape"]]
    summary = {
        "transformers": transformers.__version__, "torch": torch.__version__, "processors": kinds,
        "images": len(rows), "same_shape": len(comparable),
        "max_abs_pixel_diff": max((r["max_abs"] for r in comparable), default=None),
        "mean_abs_pixel_diff": float(np.mean([r["mean_abs"] for r in comparable])) if comparable else None,
        "mean_frac_values_differing": float(np.mean([r["frac_differ"] for r in comparable])) if comparable else None,
        "same_answers": sum(r["same_answer"] for r in rows),
        "mean_agreeing_prefix": float(np.mean([r["agreeing_prefix"] for r in rows])),
        "runtime_reproduces": "pil",
        "rows": rows,
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        tmp = Path(args.out).with_suffix(".json.part")
        tmp.write_text(text)
        tmp.replace(args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
