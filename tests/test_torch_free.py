"""The runtime runs a bundle where importing torch or transformers fails (enforced by an import blocker)."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import hf_generate

SCRIPT = r"""
import importlib.abc, json, sys
BLOCKED = ("torch", "transformers", "dream_export", "calibration")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked in this test: {name}")
sys.meta_path.insert(0, Blocker())
try:
    import torch  # noqa: F401
    raise SystemExit("the import blocker did not work")
except ImportError:
    pass
from runtime import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1])
result = pipe.generate([sys.argv[2]], sys.argv[3], max_new_tokens=12)
leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print(json.dumps({"token_ids": result.token_ids, "leaked": leaked}))
"""


def test_runtime_without_torch_or_transformers(zoo, images):
    model_dir, bundle = zoo.get("split_mha")
    prompt = "What color is the circle?"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), str(images["coffee"]), prompt],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    assert out["token_ids"] == hf_generate(str(model_dir), [images["coffee"]], prompt, 12)
