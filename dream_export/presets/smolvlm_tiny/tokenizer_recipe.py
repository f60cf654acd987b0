"""Regenerate the shipped tokenizer of ``smolvlm-tiny``: ``python -m dream_export.presets.smolvlm_tiny.tokenizer_recipe``.

The corpus is the scenes task's vocabulary plus common English, so arbitrary prompts still tokenize
sensibly (byte-level BPE covers every string anyway). Training is deterministic for this corpus.
"""

from __future__ import annotations

import itertools

from .architecture import TOKENIZER_DIR, build_tokenizer

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right", "center"]
NUMBERS = ["no", "one", "two", "three", "four", "zero", "1", "2", "3", "4"]
COMMON = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their time "
    "if will way about many then them write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line differ turn cause "
    "much mean before move right boy old too same tell does set three want air well also play small end put home "
    "read hand port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father head stand "
    "own page should country found answer school grow study still learn plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late run "
    "image photo describe shape shapes color colour colors count how many there Is Are Yes No What Where Describe"
)


def corpus() -> list[str]:
    lines = [COMMON, COMMON.capitalize() + "."]
    for color, shape in itertools.product(COLORS, SHAPES):
        lines += [
            f"What color is the {shape}?",
            f"The {shape} is {color}.",
            f"It is {color}.",
            f"Is there a {color} {shape}?",
            f"Yes, there is a {color} {shape}.",
            f"No, there is no {color} {shape}.",
            f"Where is the {color} {shape}?",
            f"What shape is {color}?",
            f"The {color} shape is a {shape}.",
            f"How many {color} shapes are there?",
        ]
        for place in PLACES:
            lines.append(f"The {color} {shape} is at the {place}. A {color} {shape} in the {place}.")
    for n in NUMBERS:
        lines += [f"There are {n} shapes.", f"There is {n} shape.", f"I count {n} shapes in the image."]
    lines += ["Describe the image.", "How many shapes are there?", "The image shows", "There are several shapes."]
    return lines * 4


if __name__ == "__main__":
    tok = build_tokenizer(corpus())
    TOKENIZER_DIR.mkdir(exist_ok=True)
    tok.save_pretrained(str(TOKENIZER_DIR))
    print(f"wrote {TOKENIZER_DIR} ({len(tok)} tokens)")
