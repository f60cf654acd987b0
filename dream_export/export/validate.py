"""Check every exported graph against PyTorch (DESIGN §2.4).

Decoder cases look like what a trained model sees, because random std-1 embeddings and K/V push real
weights far outside their range (with SmolLM2-135M, a random 16-token tree differs by 2.5e-2 in the
logits although PyTorch fp32 itself is 1.6e-3 from float64 there): a real chat-templated prompt's token
embeddings as the prefill, past K/V produced by the exported graph's own prefill, a 1-token step with the
next real token, and a 16-node tree of real tokens (random shape) over that cache. An output passes where
every element satisfies |onnx - torch| <= atol + rtol * |torch| (numpy.isclose, as Polygraphy compares);
logits also report how often the top-1 token agrees, and a top-1 that differs where the reference's top-2
margin exceeds the tolerance fails. All mismatches are collected and reported before anything is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from runtime.tree import causal_mask, depths, random_tree, tree_mask

from ..errors import ValidationError
from runtime.ort_threads import session_options

MAX_PREFILL = 64   # prompt tokens used for the prefill case
TREE_NODES = 16


@dataclass
class Check:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    atol: float
    rtol: float = 0.0
    ref_max: float = 0.0                   # the reference output's largest magnitude
    within: bool | None = None             # every element within atol + rtol*|ref| (None: max_abs_diff <= atol)
    argmax_agreement: float | None = None  # logits: share of positions whose top-1 token agrees
    argmax_clear_mismatches: int = 0       # top-1 differs although the reference's top-2 margin exceeds the tolerance
    min_agreement: float | None = None     # quantized graphs: the least top-1 agreement that passes

    @property
    def ok(self) -> bool:
        if not np.isfinite(self.max_abs_diff):
            return False
        within = self.max_abs_diff <= self.atol if self.within is None else self.within
        agrees = self.min_agreement is None or (self.argmax_agreement or 0.0) >= self.min_agreement
        return bool(within) and self.argmax_clear_mismatches == 0 and agrees

    def describe(self) -> str:
        if self.output.endswith("(relative L2 error)"):
            text = f"{self.max_abs_diff:.3g} (at most {self.atol:g})"
        else:
            text = f"max abs diff {self.max_abs_diff:.3g} (atol {self.atol:g}"
            text += f" + rtol {self.rtol:g} x |ref|, |ref| <= {self.ref_max:.3g})" if self.rtol else ")"
        if self.argmax_agreement is not None:
            text += f", top-1 agreement {self.argmax_agreement:.1%}"
            if self.min_agreement is not None:
                text += f" (at least {self.min_agreement:.0%} expected)"
            if self.argmax_clear_mismatches:
                text += f" ({self.argmax_clear_mismatches} clear mismatches)"
        return text


@dataclass
class TextSample:
    """Real token ids for the decoder cases: a chat-templated prompt and a continuation."""

    prompt_ids: np.ndarray        # [S] int64
    continuation_ids: np.ndarray  # [>= 1 + TREE_NODES] int64


def cpu_session(path) -> ort.InferenceSession:
    opts = session_options()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(graph: str, case: str, name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float = 0.0) -> Check:
    """One output: max abs diff, the element-wise atol + rtol*|ref| test, and top-1 agreement for logits."""
    if ref.shape != got.shape:
        return Check(graph, case, name, float("inf"), atol, rtol)
    if not ref.size:
        return Check(graph, case, name, 0.0, atol, rtol)
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(ref64 - got64)
    check = Check(graph, case, name, float(diff.max()), atol, rtol, float(np.abs(ref64).max()),
                  bool(np.all(diff <= atol + rtol * np.abs(ref64))) if rtol else None)
    if name == "logits" and ref.ndim >= 2:
        r = ref64.reshape(-1, ref.shape[-1])
        g = got64.reshape(-1, ref.shape[-1])
        agree = r.argmax(-1) == g.argmax(-1)
        top2 = np.sort(r, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        tol = atol + rtol * np.abs(top2[:, 1])
        check.argmax_agreement = float(agree.mean())
        check.argmax_clear_mismatches = int(np.sum(~agree & (margin > 2 * tol)))
    return check


def compare_graph_outputs(graph, case, spec, torch_outs, ort_outs) -> list[Check]:
    return [compare(graph, case, t.name, a.detach().float().numpy(), b, spec.atol, spec.rtol)
            for t, a, b in zip(spec.outputs, torch_outs, ort_outs)]


def decoder_cases(spec, embed: np.ndarray, sample: TextSample, path, seed: int) -> list[tuple[str, dict]]:
    """prefill (a real prompt), step (the next real token over the prefill's K/V) and tree16 (16 real tokens in a
    random tree over the prefill + step K/V); every past K/V comes from the exported graph at ``path``."""
    sess = cpu_session(path)
    rng = np.random.default_rng(seed)
    kv = spec.extra["kv"]
    mask_min = spec.extra["mask_min"]
    past_names = [n for pair in zip(kv["past_key"], kv["past_value"]) for n in pair]
    present_names = [n for pair in zip(kv["present_key"], kv["present_value"]) for n in pair]
    hidden = embed.shape[1]

    def feeds(ids, mask, pos, past):
        pos = np.asarray(pos, np.int64)[None]
        if spec.extra.get("rope_axes", 1) == 3:  # M-RoPE [3, 1, Q]: the three axes apart, as inside an image
            pos = np.stack([pos, pos - pos % 3, pos + pos % 4])
        f = {"inputs_embeds": np.ascontiguousarray(embed[ids], dtype=np.float32)[None], "attention_mask": mask,
             "position_ids": pos}
        f.update(zip(past_names, past))
        return f

    empty = [np.zeros((1, 0, kv["kv_heads"], kv["head_dim"]), np.float32) for _ in past_names]  # "bshd"
    prompt = sample.prompt_ids[:MAX_PREFILL]
    cont = sample.continuation_ids
    if len(cont) < 1 + TREE_NODES:
        cont = np.resize(cont, 1 + TREE_NODES)
    q = len(prompt)
    prefill = feeds(prompt, causal_mask(q, 0, mask_min), np.arange(q), empty)
    past = sess.run(present_names, prefill)
    step = feeds(cont[:1], causal_mask(1, q, mask_min), [q], past)
    past = [np.concatenate([a, b], axis=1) for a, b in zip(past, sess.run(present_names, step))]
    parents = random_tree(TREE_NODES, rng)
    p = q + 1
    tree = feeds(cont[1:1 + TREE_NODES], tree_mask(parents, p, mask_min), p + depths(parents), past)
    assert prefill["inputs_embeds"].shape[-1] == hidden
    return [("prefill", prefill), ("step", step), (f"tree{TREE_NODES}", tree)]


def validate_decoder(module, spec, path, cases) -> list[Check]:
    sess = cpu_session(path)
    checks = []
    names = [t.name for t in spec.inputs]
    for case, feeds in cases:
        with torch.no_grad():
            torch_outs = module(*[torch.from_numpy(feeds[n]) for n in names])
        ort_outs = sess.run([t.name for t in spec.outputs], feeds)
        checks += compare_graph_outputs("decoder", case, spec, torch_outs, ort_outs)
    return checks


def vision_examples(spec, sizes=None, seed: int = 0) -> list[tuple[str, dict]]:
    """(case, feeds) a vision graph is checked on: 1 and 3 fixed-size tiles, or one image at each of the adapter's
    example (height, width) sizes (a dynamic-size graph)."""
    rng = np.random.default_rng(seed + 1)
    dims = spec.inputs[0].dims
    if sizes:
        shapes = [(f"{h}x{w}", (1, dims[1], int(h), int(w))) for h, w in sizes]
    else:
        shapes = [(f"tiles{t}", (t, *dims[1:])) for t in (1, 3)]
    return [(case, {spec.inputs[0].name: rng.uniform(-1, 1, shape).astype(np.float32)}) for case, shape in shapes]


def validate_vision(module, spec, path, examples: list[tuple[str, dict]]) -> list[Check]:
    sess = cpu_session(path)
    checks = []
    for case, feeds in examples:
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        got = sess.run(None, feeds)
        checks += compare_graph_outputs("vision", case, spec, (ref,), got)
    return checks


def raise_on_mismatch(checks: list[Check]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = [f"  {c.graph}/{c.case}/{c.output}: {c.describe()}" for c in bad]
        raise ValidationError("exported graphs differ from PyTorch:\n" + "\n".join(lines))


def validate_fused_decoder(reference, spec, path, cases, slack: int = 5) -> list[Check]:
    """The fused graph against the standard torch decoder on the same cases: logits, hidden states, and the
    new K/V rows."""
    sess = cpu_session(path)
    checks = []
    names = [t.name for t in spec.inputs]
    kv = spec.extra["kv"]
    for case, feeds in cases:
        with torch.no_grad():
            ref = reference(*[torch.from_numpy(feeds[n]) for n in names])
        q = feeds["inputs_embeds"].shape[1]
        p = feeds[kv["past_key"][0]].shape[1]
        buffered = dict(feeds)
        for name in kv["past_key"] + kv["past_value"]:
            buffered[name] = _shared_buffer(feeds[name], q + slack)
        outs = sess.run([t.name for t in spec.outputs], buffered)
        # the new rows of the shared [1,kvh,T,hd] buffers, as the decoder's [1,Q,kvh,hd]
        outs = [o[:, :, p:p + q].transpose(0, 2, 1, 3) if t.name.startswith("present_") else o for t, o in zip(spec.outputs, outs)]
        checks += compare_graph_outputs(spec.name, case, spec, ref, outs)
    return checks


def validate_quantized_decoder(spec, float_path, q_path, cases, precision: str, slack: int = 5) -> list[Check]:
    """The weight-only quantized ORT-CPU decoder against the float one on the same cases: every output finite,
    the new K/V rows' relative L2 error (|q - f| / |f|) within RELATIVE_TOLERANCE, and the logits' top-1 agreement
    at least MIN_TOP1_AGREEMENT (both sanity bounds against a broken graph) (a quantized target is another model: greedy output equals plain decoding at its precision)."""
    from .quantize import MIN_TOP1_AGREEMENT, RELATIVE_TOLERANCE

    ref_sess, q_sess = cpu_session(float_path), cpu_session(q_path)
    kv = spec.extra["kv"]
    names = [t.name for t in spec.outputs]
    graph = f"{spec.name}_{precision}"
    rel = RELATIVE_TOLERANCE[precision]
    checks = []
    for case, feeds in cases:
        q = feeds["inputs_embeds"].shape[1]
        p = feeds[kv["past_key"][0]].shape[1]

        def buffered():
            out = dict(feeds)
            for name in kv["past_key"] + kv["past_value"]:
                out[name] = _shared_buffer(feeds[name], q + slack)
            return out

        ref = dict(zip(names, ref_sess.run(names, buffered())))
        got = dict(zip(names, q_sess.run(names, buffered())))
        for name in names:
            r, g = ref[name], got[name]
            if name.startswith("present_"):
                r, g = r[:, :, p:p + q], g[:, :, p:p + q]
            finite = bool(np.isfinite(g).all())
            if name.startswith("present_"):
                checks.append(relative_error_check(graph, case, name, r, g, rel))
            else:
                c = Check(graph, case, f"{name} (finite)", 0.0 if finite else float("inf"), 0.0)
                if name == "logits" and finite:
                    c.argmax_agreement = float((r.reshape(-1, r.shape[-1]).argmax(-1) == g.reshape(-1, g.shape[-1]).argmax(-1)).mean())
                    c.min_agreement = MIN_TOP1_AGREEMENT[precision]
                checks.append(c)
    return checks


def _shared_buffer(past: np.ndarray, extra: int) -> np.ndarray:
    """A fused graph's [1,kvh,P+extra,hd] buffer holding the decoder's [1,P,kvh,hd] past in its first P rows."""
    _, p, kvh, hd = past.shape
    buf = np.zeros((1, kvh, p + extra, hd), np.float32)
    buf[:, :, :p] = past.transpose(0, 2, 1, 3)
    return buf


def relative_error_check(graph: str, case: str, name: str, ref: np.ndarray, got: np.ndarray, bound: float) -> Check:
    """A quantized graph's output against the float graph's: relative L2 error |got - ref| / |ref| <= ``bound``.
    Not max-abs: weight-only quantization error grows with depth and a few outlier elements would dominate,
    while a broken graph is off by ~100%."""
    err = float(np.linalg.norm(got - ref) / (np.linalg.norm(ref) + 1e-12)) if np.isfinite(got).all() else float("inf")
    return Check(graph, case, f"{name} (relative L2 error)", err, bound)


def parents_from_mask(mask: np.ndarray, past_len: int) -> np.ndarray:
    """A tree verify mask [1,1,N,P+N] (0 where allowed) back to its parents (-1 for the root): a node's parent is
    its latest allowed earlier node (ancestors come before their descendants)."""
    allowed = mask[0, 0, :, past_len:] == 0
    n = allowed.shape[0]
    return np.array([max((j for j in range(i) if allowed[i, j]), default=-1) for i in range(n)], np.int64)


def first_chains(parents: np.ndarray, count: int) -> np.ndarray:
    """The nodes of a tree's first ``count`` root-to-leaf chains (ascending: still parents before children)."""
    from runtime.chains import chains_of

    rows, _, _ = chains_of(parents)
    return np.unique(rows[:count])


def run_chain_cases(dec, cases, kv: dict):
    """The written CPU decoder (``runtime.chains.ChainDecoder``) over ``decoder_cases``' sequence: the prefill, the
    step, then the tree (its first ``dec.chains`` chains), each over the graph's own K/V. Yields (case, kept rows of
    the case, outputs, {"key"/"value": the kept rows' new K/V as [layers, 1, N, kvh, hd]})."""
    for case, feeds in cases:
        q = feeds["inputs_embeds"].shape[1]
        p = feeds[kv["past_key"][0]].shape[1]
        if dec.length != p:
            raise ValidationError(f"{case}: the written decoder holds {dec.length} positions, the case's past {p}")
        if case.startswith("tree"):
            parents = parents_from_mask(feeds["attention_mask"], p)
            kept = first_chains(parents, dec.chains)
            remap = {int(u): i for i, u in enumerate(kept)}
            sub = np.array([remap[int(parents[u])] if parents[u] >= 0 else -1 for u in kept], np.int64)
            res = dec.run_tree(feeds["inputs_embeds"][:, kept], sub)
            rows, slots, depth = dec.last_layout()
        else:
            kept = np.arange(q)
            res = dec.run(feeds["inputs_embeds"])
            rows, slots, depth = np.arange(q)[None], np.arange(q), np.arange(q)
        yield case, kept, res, dec.new_rows(slots // max(rows.shape[1], dec.min_len), depth)
        if case.startswith("tree"):  # the last case
            return
        dec.commit()


def validate_cpu_decoder(reference, d_spec, spec, dec, cases) -> list[Check]:
    """The written CPU decoder at fp32 against the PyTorch decoder on the same cases: logits, hidden states and the
    new K/V rows (every layer), a tree case verified over its root-to-leaf chains."""
    names = [t.name for t in d_spec.inputs]
    kv = d_spec.extra["kv"]
    checks = []
    for case, kept, res, new in run_chain_cases(dec, cases, kv):
        feeds = dict(cases)[case]
        with torch.no_grad():
            ref = dict(zip([t.name for t in d_spec.outputs], reference(*[torch.from_numpy(feeds[n]) for n in names])))
        for name in ("logits", "hidden_states"):
            checks.append(compare(spec.name, case, name, ref[name].numpy()[:, kept], res[name], spec.atol, spec.rtol))
        for kind, key in (("key", "present_key"), ("value", "present_value")):
            want = np.stack([ref[n].numpy()[:, kept] for n in kv[key]])
            checks.append(compare(spec.name, case, f"present_{kind}_* (every layer)", want, new[kind], spec.atol, spec.rtol))
    return checks


def validate_quantized_cpu_decoder(spec, float_dec, q_dec, cases, kv: dict, precision: str) -> list[Check]:
    """The quantized written decoder against its fp32 build on the same sequence: every output finite, the hidden
    states' and new K/V rows' relative L2 error within RELATIVE_TOLERANCE, and the logits' top-1 agreement
    over all the sequence's positions at least MIN_TOP1_AGREEMENT (sanity bounds against a broken graph, not
    quality bounds; per case the agreement is reported, not bounded: a case of a few rows is too few to judge)."""
    from .quantize import MIN_TOP1_AGREEMENT, RELATIVE_TOLERANCE

    graph = f"{spec.name}_{precision}"
    checks, agree = [], []
    for (case, _, ref, ref_new), (_, _, got, got_new) in zip(run_chain_cases(float_dec, cases, kv),
                                                             run_chain_cases(q_dec, cases, kv)):
        finite = all(np.isfinite(got[n]).all() for n in ("logits", "hidden_states"))
        c = Check(graph, case, "logits (finite)", 0.0 if finite else float("inf"), 0.0)
        if finite:
            r, g = ref["logits"].reshape(-1, ref["logits"].shape[-1]), got["logits"].reshape(-1, got["logits"].shape[-1])
            same = r.argmax(-1) == g.argmax(-1)
            c.argmax_agreement = float(same.mean())
            agree += same.tolist()
        checks.append(c)
        checks.append(relative_error_check(graph, case, "hidden_states", ref["hidden_states"], got["hidden_states"],
                                           RELATIVE_TOLERANCE[precision]))
        for kind in ("key", "value"):
            checks.append(relative_error_check(graph, case, f"present_{kind}_*", ref_new[kind], got_new[kind],
                                               RELATIVE_TOLERANCE[precision]))
    total = Check(graph, "all cases", "logits top-1", 0.0, 0.0, argmax_agreement=float(np.mean(agree)) if agree else 0.0,
                  min_agreement=MIN_TOP1_AGREEMENT[precision])
    return checks + [total]
