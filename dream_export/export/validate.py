"""Check every exported graph against PyTorch on fresh random inputs (DESIGN §2.4).

Cases for the decoder: prefill (no past), a 1-token step, and a 16-token tree verify with a random
tree mask. All mismatches are collected and reported per output before anything is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from runtime.tree import causal_mask, random_tree, tree_mask, depths

from ..errors import ValidationError


@dataclass
class Check:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.atol


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(graph, case, spec, torch_outs, ort_outs) -> list[Check]:
    checks = []
    for t, a, b in zip(spec.outputs, torch_outs, ort_outs):
        a = a.detach().float().numpy()
        if a.shape != b.shape:
            diff = float("inf")
        else:
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        checks.append(Check(graph, case, t.name, diff, spec.atol))
    return checks


def decoder_cases(spec, seed: int) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(seed)
    kv = spec.extra["kv"]
    hidden = spec.inputs[0].dims[2]
    mask_min = spec.extra["mask_min"]
    cases = []
    for case, past_len, q_len, tree in (("prefill", 0, 11, False), ("step", 13, 1, False), ("tree16", 21, 16, True)):
        if tree:
            parents = random_tree(q_len, rng)
            mask = tree_mask(parents, past_len, mask_min)
            pos = past_len + depths(parents)
        else:
            mask = causal_mask(q_len, past_len, mask_min)
            pos = past_len + np.arange(q_len)
        feeds = {
            "inputs_embeds": rng.standard_normal((1, q_len, hidden)).astype(np.float32),
            "attention_mask": mask,
            "position_ids": pos[None].astype(np.int64),
        }
        for name in kv["past_key"] + kv["past_value"]:
            feeds[name] = rng.standard_normal((1, kv["kv_heads"], past_len, kv["head_dim"])).astype(np.float32)
        cases.append((case, feeds))
    return cases


def validate_decoder(module, spec, path, seed: int = 0) -> list[Check]:
    sess = _session(path)
    checks = []
    names = [t.name for t in spec.inputs]
    for case, feeds in decoder_cases(spec, seed):
        with torch.no_grad():
            torch_outs = module(*[torch.from_numpy(feeds[n]) for n in names])
        ort_outs = sess.run([t.name for t in spec.outputs], feeds)
        checks += _compare("decoder", case, spec, torch_outs, ort_outs)
    return checks


def validate_vision(module, spec, path, seed: int = 0) -> list[Check]:
    sess = _session(path)
    rng = np.random.default_rng(seed + 1)
    dims = spec.inputs[0].dims
    checks = []
    for tiles in (1, 3):
        x = rng.uniform(-1, 1, (tiles, *dims[1:])).astype(np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        got = sess.run(None, {spec.inputs[0].name: x})
        checks += _compare("vision", f"tiles{tiles}", spec, (ref,), got)
    return checks


def raise_on_mismatch(checks: list[Check]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = [f"  {c.graph}/{c.case}/{c.output}: max abs diff {c.max_abs_diff:.3g} > atol {c.atol:g}" for c in bad]
        raise ValidationError("exported graphs differ from PyTorch:\n" + "\n".join(lines))


def validate_fused_decoder(reference, spec, path, seed: int = 0, slack: int = 5) -> list[Check]:
    """The fused graph against the standard torch decoder: logits, hidden states, and the new K/V rows."""
    sess = _session(path)
    checks = []
    names = [t.name for t in spec.inputs]
    kv = spec.extra["kv"]
    for case, feeds in decoder_cases(spec, seed):
        with torch.no_grad():
            ref = reference(*[torch.from_numpy(feeds[n]) for n in names])
        q = feeds["inputs_embeds"].shape[1]
        p = feeds[kv["past_key"][0]].shape[2]
        buffered = dict(feeds)
        for name in kv["past_key"] + kv["past_value"]:
            buf = np.zeros((1, kv["kv_heads"], p + q + slack, kv["head_dim"]), np.float32)
            buf[:, :, :p] = feeds[name]
            buffered[name] = buf
        outs = sess.run([t.name for t in spec.outputs], buffered)
        outs = [o[:, :, p:p + q] if t.name.startswith("present_") else o for t, o in zip(spec.outputs, outs)]
        checks += _compare(spec.name, case, spec, ref, outs)
    return checks
