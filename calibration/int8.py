"""INT8 graphs by explicit quantization: QuantizeLinear/DequantizeLinear pairs in the form TensorRT consumes
(symmetric INT8, per-channel weights, per-tensor activations), calibrated on real inputs.

The quantizer is ONNX Runtime's own static QDQ quantization (``onnxruntime.quantization.quantize_static``), not
NVIDIA ModelOpt: it is already a dependency, runs on this CPU, and writes standard QDQ; ModelOpt's ``[onnx]``
extra pins onnxruntime-gpu and onnx versions that would fight the runtime's.

Calibration inputs are the graphs' real inputs: the FP32 bundle is run through the runtime on calibration prompts
(``scenes:N`` or a JSONL / LLaVA file, as ``dream-train --data`` reads) plainly and speculatively, and every
vision and decoder call's feeds are recorded (prefill, step and verify shapes alike). The last recorded calls are
held out to check the INT8 graph against the FP32 one. Which ops are quantized is a recorded decision:
the MatMuls with a constant weight (the attention and MLP projections), as SmoothQuant's W8A8 recipe does;
attention's two batched products (QK^T, P.V), the LM head (Gemm), norms, softmax, rotary and the mask stay
float, as in the FP16 graphs. Measured on SmolLM2-135M's decoder (held-out calls, relative L2 error of the
logits): not smoothed (10 MatMuls kept float for outliers) 0.34; smoothed (6 kept float) 0.16; smoothed with the
batched products float 0.13 (alpha 0.8: 0.22).

Real LLM activations have a few channels far larger than the rest (SmolLM2-135M's MLP down-projection inputs
reach 27-2,100x their 99.9th percentile), which a per-tensor INT8 scale cannot hold. Before calibration the
graph is smoothed as SmoothQuant (Xiao et al., 2023) does, the W8A8 recipe TensorRT-LLM and ModelOpt use for
INT8: each quantized MatMul's input channel j is divided by ``s_j = max|X_j|^a / max|W_j|^(1-a)`` and the
weight's row j multiplied by it, which leaves the float graph's function unchanged. The division is folded into
whatever makes X, where that is a per-channel constant: a norm's weight (the QKV and gate/up inputs) or the
columns of the projection that feeds an element-wise product (the down-projection's input, through up_proj).
MatMuls whose input has no such producer are not smoothed. ONNX Runtime's own ``SmoothQuant`` option needs
neural-compressor 2.x, which pins numpy below 2; this is the same transform, written for these graphs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from dream_export.scenes import CALIB_SEED
from runtime.ort_threads import session_options

QUANTIZED_OPS = ["MatMul"]
INT8_RELATIVE_TOLERANCE = 0.3    # relative L2 error of every output vs the FP32 graph on held-out calls: a sanity
                                 # bound (a broken graph is off by ~100%; per-tensor INT8 activations reach 0.2 on smolvlm-tiny)
INT8_MIN_TOP1_AGREEMENT = 0.85
# A MatMul whose activation input has outliers (largest |x| over its 99.9th percentile, measured on the calibration
# inputs) above this ratio stays float: a per-tensor INT8 scale set by the outlier rounds every ordinary value of
# that tensor to a few levels. Real weights need it: SmolLM2-135M's MLP down-projection inputs reach ratios of
# 27-2,100 in 6 of 30 layers, and with them quantized the held-out K/V were 45% off after three layers.
OUTLIER_RATIO = 8.0
SMOOTH_ALPHA = 0.5               # SmoothQuant's migration strength a: 0 leaves activations as they are, 1 moves all
                                 # of their range into the weights (0.5 is the paper's default for most models)
NEAR_TIE = 0.05                  # top-1 "agrees" when INT8's pick is within 5% of FP32's logit range of FP32's top-1
FORMAT = ("QDQ; symmetric INT8; per-channel weights; per-tensor activations (MinMax); SmoothQuant migration; "
          "projections only (activation-by-activation MatMuls float)")


class CalibrationError(Exception):
    pass


def record_inputs(bundle: Path, samples, graphs=("vision", "decoder"), max_new_tokens: int = 32,
                  limit: int = 400) -> dict:
    """graph -> list of feeds, recorded while the FP32 bundle answers ``samples`` (dream_export.train.data
    Samples), plain and speculative, on its standard graphs."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, fused=False)
    recorded = {g: [] for g in graphs}
    run = pipe.backend.run

    def wrapped(graph, feeds, outputs=None):
        if graph in recorded and len(recorded[graph]) < limit:
            recorded[graph].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return run(graph, feeds, outputs)

    pipe.backend.run = wrapped
    from dream_export.train.data import open_images

    modes = [False, True] if pipe.has_drafter else [False]
    for i, sample in enumerate(samples):
        pipe.generate(open_images(sample), sample.prompt, max_new_tokens=max_new_tokens, speculative=modes[i % len(modes)])
    return recorded


def outlier_matmuls(path: Path, feeds: list[dict], ratio: float = OUTLIER_RATIO, max_feeds: int = 8) -> dict:
    """MatMul node -> its activation input's outlier ratio (max |x| / 99.9th percentile of |x|) over ``feeds``,
    for the nodes above ``ratio``."""
    import onnx
    import onnxruntime as ort

    from dream_export.export.precision import with_all_outputs

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    wanted = {n.name: [i for i in n.input if i and i not in inits] for n in model.graph.node if n.op_type in QUANTIZED_OPS}
    opts = session_options()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(with_all_outputs(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    need = {t for ts in wanted.values() for t in ts}
    seen: dict[str, list] = {}
    for f in feeds[:max_feeds]:
        feed = {k: v for k, v in f.items() if k in inputs}
        for name, v in [*zip(names, sess.run(names, feed)), *feed.items()]:  # intermediates and graph inputs
            if name in need and v.dtype == np.float32 and v.size:
                seen.setdefault(name, []).append(np.abs(v).ravel())
    out = {}
    for node, tensors in wanted.items():
        worst = 0.0
        for t in tensors:
            if t in seen:
                a = np.concatenate(seen[t])
                worst = max(worst, float(a.max() / max(np.percentile(a, 99.9), 1e-12)))
        if worst > ratio:
            out[node] = round(worst, 1)
    return out


def channel_max(model, tensors: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each named float tensor of ``model`` over ``feeds``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in known)
    opts = session_options()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        for name, v in zip(tensors, sess.run(tensors, {k: v for k, v in f.items() if k in inputs})):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(0) if v.size else None
            if m is not None:
                out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def smooth_matmuls(src: Path, dst: Path, feeds: list[dict], alpha: float = SMOOTH_ALPHA) -> dict:
    """Write ``src`` smoothed (SmoothQuant, see the module docstring) to ``dst``; returns the record."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    used_by: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            used_by.setdefault(i, []).append(n)

    def single_use(name: str) -> bool:
        return len(used_by.get(name, [])) == 1

    groups: dict[str, list] = {}  # activation tensor -> the MatMuls that read it with a weight of their own
    for n in model.graph.node:
        if (n.op_type in QUANTIZED_OPS and n.input[0] not in inits and n.input[1] in inits
                and len(inits[n.input[1]].dims) == 2 and single_use(n.input[1])):
            groups.setdefault(n.input[0], []).append(n)

    def fold_target(x: str, group: list):
        """Where 1/s can go: ("norm", per-channel weight) or ("columns", weight of the MatMul making a factor)."""
        if any(c not in group and c.op_type != "Shape" for c in used_by[x]):  # Shape reads no values
            return None
        p = made_by.get(x)
        if p is None or p.op_type != "Mul":
            return None
        channels = inits[group[0].input[1]].dims[0]
        for a in p.input:
            if a in inits and single_use(a) and int(np.prod(inits[a].dims)) == channels:
                return "norm", a
            q = made_by.get(a)
            if (q is not None and q.op_type == "MatMul" and single_use(a) and q.input[1] in inits
                    and single_use(q.input[1]) and len(inits[q.input[1]].dims) == 2 and inits[q.input[1]].dims[1] == channels):
                return "columns", q.input[1]
        return None

    targets = {x: t for x, g in groups.items() if (t := fold_target(x, g)) is not None}
    xmax = channel_max(model, sorted(targets), feeds)

    def update(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    folded = {"norm": 0, "columns": 0}
    for x, (kind, target) in targets.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in groups[x]]
        wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
        s = np.where((xmax[x] > 0) & (wmax > 0), xmax[x] ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        for n, w in zip(groups[x], weights):
            update(n.input[1], w * s[:, None])
        t = numpy_helper.to_array(inits[target])
        update(target, t / s.reshape(t.shape) if kind == "norm" else t / s[None, :])
        folded[kind] += 1
    onnx.save(model, str(dst))
    return {"method": "SmoothQuant", "alpha": alpha, "smoothed_inputs": len(targets),
            "folded_into_norm_weights": folded["norm"], "folded_into_producing_matmuls": folded["columns"],
            "not_smoothed": sum(len(g) for x, g in groups.items() if x not in targets)}


def activation_products(path: Path) -> list[str]:
    """The MatMuls of two activations (attention's QK^T and P.V): they stay float, as in SmoothQuant's W8A8
    recipe, where only the projections (MatMuls with a constant weight) run in INT8."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and not any(i in inits for i in n.input)]


def quantize_graph(src: Path, dst: Path, feeds: list[dict], alpha: float | None = SMOOTH_ALPHA) -> dict:
    """Write the QDQ INT8 twin of ``src`` to ``dst`` (smoothed first unless ``alpha`` is None); returns the record
    of the smoothing and of the MatMuls kept float for outliers."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    import onnx

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        inline = Path(tmp) / "inline.onnx"  # the bundle's shared weights.bin, read in: the quantizer works on copies
        onnx.save(onnx.load(str(src)), str(inline))
        pre = Path(tmp) / "pre.onnx"
        # shape inference and folding first (skip_symbolic_shape: these graphs' dynamic dims defeat it)
        quant_pre_process(str(inline), str(pre), skip_symbolic_shape=True)
        smoothing = None
        if alpha is not None:
            smoothed = Path(tmp) / "smoothed.onnx"
            smoothing = smooth_matmuls(pre, smoothed, feeds, alpha)
            pre = smoothed
        kept = outlier_matmuls(pre, feeds)
        products = activation_products(pre)
        out = Path(tmp) / "q.onnx"
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=sorted(set(kept) | set(products)),
                        # Q/DQ on the weights and on the activation inputs of each MatMul, as TensorRT places them;
                        # none on its output: that would quantize QK^T scores before the mask and the softmax
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"]})
        out.replace(dst)
    return {"outlier_ratio": OUTLIER_RATIO, "float_matmuls": kept, "smoothing": smoothing}


def top1_agreement(ref: np.ndarray, got: np.ndarray, near: float = NEAR_TIE) -> float:
    """Share of rows whose INT8 top-1 token is FP32's top-1, or within ``near`` x the row's FP32 logit range of
    it (a near-tie either model may break either way: random-weight test models are all near-ties)."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    g = got.reshape(-1, got.shape[-1])
    pick = g.argmax(-1)
    best = r.max(-1)
    picked = r[np.arange(len(r)), pick]
    return float(np.mean(picked >= best - near * (best - r.min(-1))))


def validate_int8(name: str, float_path: Path, q_path: Path, feeds: list[dict]) -> list[dict]:
    """The INT8 graph against its FP32 graph on held-out recorded calls."""
    import onnxruntime as ort

    opts = session_options()
    opts.log_severity_level = 3
    ref, got_s = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (float_path, q_path))
    names = [o.name for o in ref.get_outputs()]
    checks = []
    for i, f in enumerate(feeds):
        r = dict(zip(names, ref.run(names, f)))
        g = dict(zip(names, got_s.run(names, f)))
        for out in names:
            if r[out].dtype != np.float32:
                continue
            err = float(np.linalg.norm(g[out] - r[out]) / (np.linalg.norm(r[out]) + 1e-12)) if np.isfinite(g[out]).all() else float("inf")
            c = {"graph": f"{name}_int8", "case": f"heldout{i}", "output": f"{out} (relative L2 error)", "max_abs_diff": err,
                 "atol": INT8_RELATIVE_TOLERANCE, "ok": err <= INT8_RELATIVE_TOLERANCE}
            if out == "logits" and np.isfinite(g[out]).all():
                agree = top1_agreement(r[out], g[out])
                c.update(argmax_agreement=agree, min_agreement=INT8_MIN_TOP1_AGREEMENT, ok=c["ok"] and agree >= INT8_MIN_TOP1_AGREEMENT)
            checks.append(c)
    return checks


def calibrate_bundle(src: Path, out: Path, data: str = "scenes:48", samples: int | None = None,
                     force: bool = False, heldout: int = 4) -> Path:
    """Write ``out``: the FP32 bundle ``src`` with its vision and decoder graphs replaced by calibrated INT8 QDQ
    graphs, each checked against the FP32 graph; the manifest records precision, quantized ops, format and the
    calibration set. Nothing is half-written: the bundle is assembled in a temp folder and renamed."""
    from dream_export.train.data import load_samples
    from runtime.bundle import MANIFEST, Bundle, sha256_file

    out = Path(out)
    if out.exists() and not force:
        raise CalibrationError(f"{out}: output folder exists; pass --force to replace it")
    items = load_samples(data, seed=CALIB_SEED)
    if samples is not None:
        if samples < 1:
            raise CalibrationError(f"--calib-samples {samples}: expected at least 1")
        items = items[:samples]
    if len(items) < 2:
        raise CalibrationError(f"--calib-data {data!r}: {len(items)} prompt(s); expected at least 2 (some are held out)")
    recorded = record_inputs(Path(src), items)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        manifest = json.loads((tmp / MANIFEST).read_text())
        all_checks = []
        for graph, feeds in recorded.items():
            if not feeds:
                continue
            n_held = min(heldout, max(1, len(feeds) // 5))
            calib, held = feeds[:-n_held], feeds[-n_held:]
            entry = manifest["graphs"][graph]
            src_path = tmp / entry["file"]
            q_path = tmp / f"{Path(entry['file']).stem}_int8.onnx"
            kept = quantize_graph(src_path, q_path, calib or feeds)
            checks = validate_int8(graph, src_path, q_path, held)
            bad = [c for c in checks if not c["ok"]]
            if bad:
                lines = "; ".join(f"{c['graph']}/{c['case']}/{c['output']}: {c['max_abs_diff']:.3g} "
                                  f"(at most {c['atol']})" + (f", top-1 {c['argmax_agreement']:.0%}" if "argmax_agreement" in c else "")
                                  for c in bad[:6])
                raise CalibrationError(f"INT8 {graph} differs too much from FP32 on held-out calls: {lines}. Per-tensor "
                                       f"INT8 activations are too coarse for this model's activation ranges (MatMuls "
                                       f"kept float for outliers: {len(kept['float_matmuls'])}); use --precision fp16")
            all_checks += checks
            from dream_export.export.onnx_io import op_inventory

            inventory = op_inventory(q_path)
            if inventory["non_standard"] or inventory["not_trt_parsable"]:
                raise CalibrationError(f"{q_path.name}: ops TensorRT cannot parse: "
                                       f"{inventory['non_standard'] + inventory['not_trt_parsable']}")
            src_path.unlink()
            entry.update(inventory)
            entry["file"] = q_path.name
            entry["external_data"] = []
            entry.update(precision="int8", quantized_ops=QUANTIZED_OPS, quantization=FORMAT, kept_float=kept,
                         calibration={"data": data, "prompts": len(items), "calls": len(calib), "heldout_calls": len(held),
                                      "seed": CALIB_SEED if data.startswith("scenes:") else None})
        manifest["precision"] = "int8"
        manifest["validation"] = list(manifest.get("validation", [])) + all_checks
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        part = tmp / (MANIFEST + ".part")
        part.write_text(json.dumps(manifest, indent=1))
        os.replace(part, tmp / MANIFEST)
        Bundle.load(tmp)  # verifies every file
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
