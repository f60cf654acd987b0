"""Export a target VLM into a validated bundle (the exporter core: it never names a model family)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, sha256_file
from runtime.tree import TreeSpec

from .. import __version__
from ..errors import DreamExportError
from .graphs import DecoderGraph, set_eager_attention
from .onnx_io import export_graph, op_inventory
from .fused import FusedDecoderGraph
from .specs import decoder_spec, fused_decoder_spec
from .validate import decoder_cases, raise_on_mismatch, validate_decoder, validate_fused_decoder, validate_vision
from .weights import WEIGHTS_FILE, externalize, share_weights


@dataclass
class ExportOptions:
    out: Path
    force: bool = False
    seed: int = 0
    fused_cpu_graph: bool = True   # also write decoder_ort_cpu.onnx (Llama-style text models)
    drafter: Path | None = None    # a DREAM drafter folder (dream-train output) to add
    tree: "TreeSpec | None" = None
    keep_visual: float | None = None  # override the drafter config's visual token compression
    draft_precision: str | None = None  # int8 / int4: also an ORT-CPU draft graph with weight-only quantized MatMuls
    #                                     (None: as cpu_precision when that is int8/int4, else fp32)
    draft_float: str | None = None    # the draft graphs' own precision (fp32 / fp16); None: fp16 when precision is
    runtime: dict | None = None       # manifest "runtime" defaults (threads, speculative) measured for a shipped drafter
    cpu_precision: str = "fp32"       # int8 / int4: the ORT-CPU decoder with weight-only quantized MatMuls (LM head too)
    precision: str = "fp32"           # fp16: vision and decoder graphs in FP16 with FP32 islands (export/precision.py)
    head_bits: int | None = None      # the written ORT-CPU decoder's LM head width (8 or 4; default: cpu_precision's)
    max_chains: int = 2               # root-to-leaf chains one verify call of the written ORT-CPU decoder holds
    gpu_graphs: bool | None = None    # the float graphs TensorRT builds from; None: unless cpu_precision is int8/int4


class _Stages:
    """A rich progress display of the export stages (plain lines when not a terminal)."""

    def __init__(self, names: list[str], quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)
        self.names = names

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        with self.console.status(f"[bold]{name}…"):
            yield
        self.console.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - t0:.1f}s)[/]")

    def print(self, *args, **kwargs):
        self.console.print(*args, **kwargs)


def load_target(source: str):
    """Load model + processor with transformers' own classes (no remote code)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..registry import load_pretrained

    config = load_pretrained(source, AutoConfig)
    try:
        processor = load_pretrained(source, AutoProcessor)
    except ImportError as exc:  # e.g. a video processor, which transformers builds only with torchvision
        missing = " ".join(str(exc).split())[:200]
        raise DreamExportError(
            f"{source}: transformers cannot build this model's processor here ({missing}). SmolVLM2, Qwen2.5-VL and "
            f"Pixtral processors need torchvision, which does not import beside the CPU torch 2.13.0: export from the "
            f"export-tv environment (python3 -m venv .venv-tv && .venv-tv/bin/pip install -e '.[export-tv]')") from exc
    model = load_pretrained(source, AutoModelForImageTextToText, config=config, dtype=torch.float32)
    return model.eval(), processor


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not force:
        raise DreamExportError(f"{out}: output folder exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing one (``--force``) is replaced only now."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@dataclass
class _Target:
    """What the exporter reads off the target once: its adapter, text shapes and the graphs' I/O specs."""

    adapter: object
    tcfg: object
    head_dim: int
    kv_heads: int
    num_layers: int
    vocab: int
    hidden: int
    rope_axes: int
    v_spec: object
    v_examples: list
    d_spec: object
    f_spec: object        # the traced fused ORT-CPU decoder's spec, or None
    written: bool         # the written ORT-CPU decoder (export/cpu_decoder.py) replaces the fused one
    gpu_graphs: bool      # keep the float graphs TensorRT builds from
    embed_scale: float
    emb: np.ndarray       # token embeddings [V, H]


def _checked_options(opts: ExportOptions) -> ExportOptions:
    from .precision import PRECISIONS

    if opts.precision not in PRECISIONS:
        hint = ("INT8 graphs are calibrated from an FP32 bundle by calibration.int8.calibrate_bundle "
                "(dream-export --precision int8 does both); " if opts.precision == "int8" else "")
        raise DreamExportError(f"precision {opts.precision!r}: {hint}export_bundle expects one of {', '.join(PRECISIONS)}")
    if opts.head_bits not in (None, 4, 8):
        raise DreamExportError(f"head_bits={opts.head_bits}: expected 4 or 8")
    if opts.draft_precision is None:  # a CPU target's drafter at the same weight precision
        opts = replace(opts, draft_precision=opts.cpu_precision if opts.cpu_precision in ("int8", "int4") else "fp32")
    return opts


def _read_target(model, processor, opts: ExportOptions) -> _Target:
    from ..targets import adapter_for
    from .cpu_decoder import unsupported

    adapter = adapter_for(model, processor)
    set_eager_attention(model)
    tcfg = adapter.text_config
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    kv_heads = getattr(tcfg, "num_key_value_heads", None) or tcfg.num_attention_heads
    num_layers = len(adapter.decoder_layers())
    vocab = adapter.lm_head().weight.shape[0]
    hidden = tcfg.hidden_size
    v_spec, v_examples = adapter.vision_graph(hidden, opts.seed)  # the graph's I/O and the feeds it is checked on
    rope_axes = adapter.rope_axes()
    written = opts.cpu_precision != "fp32" and unsupported(adapter) is None
    if written and not 1 <= opts.max_chains <= 8:
        raise DreamExportError(f"max_chains={opts.max_chains}: expected 1..8 root-to-leaf chains per verify call")
    fused_ok = opts.fused_cpu_graph and adapter.fused_cpu_graph() and not written
    gpu_graphs = opts.gpu_graphs if opts.gpu_graphs is not None else opts.cpu_precision == "fp32"
    if not gpu_graphs and not written:
        raise DreamExportError(f"a CPU-only bundle needs the written ORT-CPU decoder (--cpu-precision int8|int4 on a "
                               f"family it supports); this target: {unsupported(adapter) or 'cpu precision fp32'}")
    return _Target(adapter, tcfg, head_dim, kv_heads, num_layers, vocab, hidden, rope_axes, v_spec, v_examples,
                   decoder_spec(num_layers, kv_heads, head_dim, hidden, vocab, rope_axes),
                   fused_decoder_spec(num_layers, kv_heads, head_dim, hidden, vocab, rope_axes) if fused_ok else None,
                   written, gpu_graphs, adapter.embed_scale(), adapter.embed_tokens().weight.detach().float().numpy())


def export_bundle(model, processor, source_info: dict, opts: ExportOptions, quiet: bool = False) -> Path:
    """Export ``model`` into a checked bundle at ``opts.out``: every graph is checked against PyTorch before the
    bundle is written; nothing is half-written (a temp folder, renamed into place at the end)."""
    opts = _checked_options(opts)
    stages = _Stages([], quiet=quiet)
    t = _read_target(model, processor, opts)
    tmp = _prepare_out(opts.out, opts.force)
    try:
        checks, graphs, cpu_specs, cpu_arrays = _export_target_graphs(t, opts, tmp, stages)
        drafter_info = None
        if opts.drafter is not None:
            drafter_info, dr_specs, dr_checks = _export_drafter(t.adapter, opts, tmp, stages)
            checks += dr_checks
            for spec in dr_specs:
                graphs[spec.name] = _inventory_checked(spec, tmp)
        _print_checks(stages, checks)
        raise_on_mismatch(checks)
        if not t.gpu_graphs:
            _drop_float_graphs(t, opts, graphs, drafter_info, tmp, stages)
        for spec in (t.v_spec, t.d_spec, t.f_spec, *cpu_specs):
            if spec is not None:
                graphs[spec.name] = _inventory_checked(spec, tmp)
        with stages.stage("one copy of every weight (graphs share weights.bin)"):
            arrays = {k: np.asarray(v, np.float32) for k, v in t.adapter.extra_arrays().items()}  # e.g. LLaVA-NeXT's image_newline
            token_rows = {"embed_tokens": t.emb} if t.gpu_graphs else {}  # the written decoder's runtime reads quantized rows
            placed, used = share_weights(tmp, [g["file"] for g in graphs.values()],
                                         extra={**token_rows, **cpu_arrays, **arrays})
            for g in graphs.values():
                g["external_data"] = sorted(used[g["file"]])
        with stages.stage("tokenizer, manifest"):
            (tmp / "tokenizer.json").write_text(t.adapter.tokenizer_json())
            manifest = _manifest(t, opts, source_info, graphs, placed, arrays, cpu_specs, drafter_info, checks)
            manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            tmp_manifest = tmp / (MANIFEST + ".part")
            tmp_manifest.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp_manifest, tmp / MANIFEST)
        with stages.stage("verify bundle"):
            Bundle.load(tmp)
        os.chmod(tmp, 0o755)
        _commit(tmp, opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stages.print(f"[bold green]bundle written:[/] {opts.out}")
    return opts.out


def _export_target_graphs(t: _Target, opts: ExportOptions, tmp: Path, stages):
    """The vision and decoder graphs, each checked against PyTorch: the standard decoder, then the ORT-CPU one
    (traced fused, or written for int8/int4), then the FP16 twins. Returns (checks, graphs so far, the written
    decoder's specs, its arrays); ``t``'s specs are updated to what the bundle keeps."""
    checks, graphs = [], {}
    v_spec, d_spec = t.v_spec, t.d_spec
    with stages.stage("vision tower + connector → vision.onnx"):
        vision = t.adapter.vision_module().eval()
        biggest = max(t.v_examples, key=lambda e: e[1][v_spec.inputs[0].name].size)[1]  # no size-1 dims to bake in
        example = tuple(torch.from_numpy(biggest[i.name]) for i in v_spec.inputs)
        export_graph(vision, v_spec, example, tmp / v_spec.file)
    with stages.stage("check vision.onnx against PyTorch"):
        checks += validate_vision(vision, v_spec, tmp / v_spec.file, t.v_examples)
    with stages.stage(f"text decoder ({t.num_layers} layers) → decoder.onnx"):
        decoder = DecoderGraph(t.adapter, d_spec.extra["mask_min"]).eval()
        export_graph(decoder, d_spec, _decoder_dummy(d_spec, past_len=3, q_len=2), tmp / d_spec.file)
    with stages.stage("check decoder.onnx against PyTorch (a real prompt, a step, a 16-token tree of real tokens)"):
        cases = decoder_cases(d_spec, t.emb * np.float32(t.embed_scale), t.adapter.validation_sample(),
                              tmp / d_spec.file, opts.seed)
        checks += validate_decoder(decoder, d_spec, tmp / d_spec.file, cases)
    if t.f_spec is not None:
        with stages.stage("ORT-CPU decoder (fused GroupQueryAttention, in-place KV) → decoder_ort_cpu.onnx"):
            fused = FusedDecoderGraph(t.adapter, d_spec.extra["mask_min"]).eval()
            export_graph(fused, t.f_spec, _decoder_dummy(d_spec, past_len=3, q_len=2, capacity=8), tmp / t.f_spec.file)
        with stages.stage("check decoder_ort_cpu.onnx against the PyTorch decoder"):
            checks += validate_fused_decoder(decoder, t.f_spec, tmp / t.f_spec.file, cases)
        if opts.cpu_precision != "fp32":
            t.f_spec, q_checks = _quantize_cpu_decoder(t.f_spec, tmp, cases, opts.cpu_precision, stages)
            checks += q_checks
    cpu_specs, cpu_arrays = [], {}
    if t.written:
        from .cpu_decoder import export_cpu_decoders

        cpu_specs, c_checks, cpu_arrays = export_cpu_decoders(t.adapter, decoder, d_spec, cases, tmp, opts.cpu_precision,
                                                              opts.head_bits, opts.max_chains, stages)
        checks += c_checks
    if opts.precision != "fp32":
        t.v_spec, t.d_spec, p_checks = _fp16_graphs(v_spec, d_spec, tmp, cases, t.v_examples, stages)
        checks += p_checks
    return checks, graphs, cpu_specs, cpu_arrays


def _drop_float_graphs(t: _Target, opts: ExportOptions, graphs: dict, drafter_info, tmp: Path, stages) -> None:
    """A CPU-only bundle: the float graphs were the written decoder's reference, nothing more."""
    (tmp / t.d_spec.file).unlink()
    t.d_spec = None
    if drafter_info and drafter_info.get("tree_graph_ort_cpu"):
        (tmp / graphs.pop(drafter_info["tree_graph"])["file"]).unlink()
        drafter_info["tree_graph"] = None
    if drafter_info and opts.draft_precision != "fp32":
        graphs["drafter"] = _quantize_stepwise_drafter(graphs["drafter"], tmp, opts.draft_precision, stages)


def _manifest(t: _Target, opts: ExportOptions, source_info: dict, graphs: dict, placed: dict, arrays: dict,
              cpu_specs: list, drafter_info, checks) -> dict:
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {**source_info, "family": t.adapter.family},
        "text": {
            "hidden_size": t.hidden,
            "vocab_size": t.vocab,
            "num_layers": t.num_layers,
            "kv_heads": t.kv_heads,
            "head_dim": t.head_dim,
            "max_positions": int(t.tcfg.max_position_embeddings),
            "num_heads": int(t.tcfg.num_attention_heads),
            "intermediate_size": int(getattr(t.tcfg, "intermediate_size", 0) or 4 * t.hidden),
            "embed_scale": t.embed_scale,                      # token rows are multiplied by it
            "attention_windows": t.adapter.attention_windows(),  # applied inside the decoder graph
            "image_attention": t.adapter.image_attention(),      # the runtime's prompt mask rule
            "rope_axes": t.rope_axes,                            # 3: M-RoPE position ids (runtime/rope.py)
        },
        "graphs": graphs,
        "embeddings": placed["embed_tokens"] if t.gpu_graphs else None,
        # the written ORT-CPU decoder's model: token rows quantized as its LM head; its rotary tables
        "embeddings_cpu": _quantized_embeddings(placed, cpu_specs[0], t.hidden) if t.written else None,
        "rope_tables": {"cos": placed["rope_cos"], "sin": placed["rope_sin"]} if t.written else None,
        "arrays": {k: placed[k] for k in arrays},  # what the family's preprocessing needs at run time
        "tokenizer": {"file": "tokenizer.json"},
        "preprocessing": t.adapter.preprocessing(),
        "chat_template": t.adapter.chat_template(),
        "chat_template_vars": t.adapter.chat_template_vars(),
        "special_tokens": {"stop_token_ids": t.adapter.stop_token_ids(), "image_token_id": t.adapter.image_token_id},
        "precision": opts.precision,
        "tree": (opts.tree or TreeSpec()).to_json() if drafter_info else None,
        "drafter": drafter_info,
        "validation": [c_.__dict__ for c_ in checks],
    }
    if opts.runtime and drafter_info:
        manifest["runtime"] = dict(opts.runtime)
    return manifest


def _quantize_stepwise_drafter(entry: dict, folder: Path, precision: str, stages) -> dict:
    """A CPU-only bundle's stepwise drafter graph with MatMulNBits weights (int8 compute), in place of the float
    one; its output is a proposal the target verifies, so any precision stays lossless."""
    from .quantize import PRECISIONS, quantize_matmuls

    src = folder / entry["file"]
    part = folder / (entry["file"] + ".q")
    with stages.stage(f"{precision} weights for the stepwise drafter (MatMulNBits, int8 compute) → {entry['file']}"):
        quantize_matmuls(src, part, PRECISIONS[precision], accuracy_level=4)
        os.replace(part, src)
    return {**entry, "precision": precision}


def _quantized_embeddings(placed: dict, spec, hidden: int) -> dict:
    """The manifest entry of token embeddings stored as the LM head's blockwise-quantized rows."""
    bits = int(spec.extra["head_bits"])
    return {"quantized": {"bits": bits, "block": 32, "columns": hidden, "data": placed["embed_q"],
                          "scales": placed["embed_scales"], "zero_points": placed.get("embed_zero_points")}}


def _fp16_graphs(v_spec, d_spec, folder: Path, cases, vision_cases, stages):
    """Replace vision.onnx and decoder.onnx by their FP16 twins (FP32 islands, FP32 I/O), each checked against
    the FP32 graph it came from. The fused ORT-CPU decoder stays FP32 (a CPU has no fast FP16 path)."""
    checks, out = [], []
    for spec, spec_cases in ((v_spec, vision_cases), (d_spec, cases)):
        spec, c = fp16_graph(spec, folder, spec_cases, stages)
        checks += c
        out.append(spec)
    return out[0], out[1], checks


def fp16_graph(spec, folder: Path, cases, stages):
    """Replace ``spec``'s graph in ``folder`` by its FP16 twin (fixed and measured FP32 islands, FP32 I/O), checked
    against the FP32 graph on ``cases``; returns (the spec with its precision record, checks)."""
    from dataclasses import replace

    from .precision import to_fp16, validate_fp16

    src = folder / spec.file
    fp32_copy = folder / (spec.file + ".fp32")
    src.rename(fp32_copy)
    with stages.stage(f"fp16 {spec.file} (weights and matrix products FP16; norms, softmax, mask, rotary, head and "
                      f"measured outliers FP32)"):
        record = to_fp16(fp32_copy, src, cases)
    with stages.stage(f"check fp16 {spec.file} against its FP32 graph"):
        checks, max_act = validate_fp16(spec.name, fp32_copy, src, cases)
    fp32_copy.unlink()
    return replace(spec, extra={**spec.extra, **record, "max_fp16_activation": round(max_act, 3)}), checks


def _quantize_cpu_decoder(f_spec, folder: Path, cases, precision: str, stages):
    """Replace the float ORT-CPU decoder with its weight-only int8/int4 twin, checked against it."""
    from dataclasses import replace

    from .quantize import PRECISIONS, TARGET_ACCURACY_LEVEL, quantize_matmuls
    from .validate import validate_quantized_decoder

    if not PRECISIONS.get(precision):
        raise DreamExportError(f"--cpu-precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    q_spec = replace(f_spec, file=f"{f_spec.file[:-len('.onnx')]}_{precision}.onnx", extra={**f_spec.extra, "precision": precision})
    bits = PRECISIONS[precision]
    with stages.stage(f"{precision} weights for the ORT-CPU decoder (MatMulNBits; the LM head stays fp32) → {q_spec.file}"):
        quantize_matmuls(folder / f_spec.file, folder / q_spec.file, bits, heads=False, accuracy_level=TARGET_ACCURACY_LEVEL)
    with stages.stage(f"check {q_spec.file} against the float {f_spec.file}"):
        checks = validate_quantized_decoder(f_spec, folder / f_spec.file, folder / q_spec.file, cases, precision)
    (folder / f_spec.file).unlink()
    return q_spec, checks


def _inventory_checked(spec, folder: Path) -> dict:
    """The graph's manifest entry with its op inventory. Graphs named ``*_ort_cpu`` are ONNX-Runtime-only by
    design (com.microsoft ops); every other graph must be parsable by TensorRT 8.6/10."""
    inv = op_inventory(folder / spec.file)
    ort_only = spec.name.endswith("_ort_cpu") or spec.extra.get("for_backend") == "onnxruntime-cpu"
    if not ort_only and (inv["non_standard"] or inv["not_trt_parsable"]):
        raise DreamExportError(f"{spec.file}: ops TensorRT 8.6/10 cannot parse: {inv['non_standard'] + inv['not_trt_parsable']}")
    return {**spec.to_json(), **inv}


def _export_drafter(adapter, opts: ExportOptions, tmp: Path, stages):
    from dataclasses import asdict

    from ..drafter.released import load_any
    from .drafter_export import DrafterGraph, drafter_dummy, validate_drafter
    from .specs import drafter_spec

    drafter = load_any(opts.drafter, adapter.lm_head().weight)
    cfg = drafter.config
    if cfg.hidden_size != adapter.text_config.hidden_size or cfg.vocab_size != adapter.lm_head().weight.shape[0]:
        raise DreamExportError(
            f"{opts.drafter}: drafter hidden {cfg.hidden_size} / vocab {cfg.vocab_size} do not match the target's "
            f"{adapter.text_config.hidden_size} / {adapter.lm_head().weight.shape[0]}"
        )
    tree = opts.tree or TreeSpec()
    spec = drafter_spec(drafter.past_shapes(), cfg.hidden_size, cfg.draft_vocab_size, tree.to_json())
    from ..drafter.exported import ExportedDrafter

    with stages.stage("DREAM drafter → drafter.onnx"):
        export_graph(DrafterGraph(ExportedDrafter(drafter)).eval(), spec, drafter_dummy(cfg, drafter.past_shapes()), tmp / spec.file)
    with stages.stage("check drafter.onnx against the PyTorch drafter (catch-up, step, tree level)"):
        checks = validate_drafter(DrafterGraph(drafter).eval(), cfg, spec, tmp / spec.file, opts.seed)
    graph_precision = draft_float(opts)
    t_specs, t_checks = _export_draft_tree(drafter, adapter.embed_tokens().weight, spec, tree, tmp, stages, opts.seed,
                                           opts.draft_precision, graph_precision, adapter.embed_scale())
    if graph_precision == "fp16":
        from .drafter_export import drafter_cases

        spec, c = fp16_graph(spec, tmp, drafter_cases(cfg, spec, opts.seed), stages)
        checks += c
    checks += t_checks
    if cfg.draft_vocab:
        np.save(tmp / "draft_to_target.npy", np.asarray(cfg.draft_vocab, dtype=np.int64))
    info = {
        "graph": "drafter",
        "tree_graph": "draft_tree",
        # ORT on a CPU runs this one instead when present (quantized weights; TensorRT keeps draft_tree)
        "tree_graph_ort_cpu": "draft_tree_ort_cpu" if len(t_specs) > 1 else None,
        "draft_precision": opts.draft_precision,
        "graph_precision": graph_precision,  # drafter / draft_tree (what TensorRT builds); draft_precision: the CPU twin
        "config": asdict(cfg),
        "keep_visual": float(opts.keep_visual if opts.keep_visual is not None else cfg.keep_visual),
        "draft_to_target": "draft_to_target.npy" if cfg.draft_vocab else None,
        "source": str(opts.drafter),
    }
    return info, (spec, *t_specs), checks


def draft_float(opts: ExportOptions) -> str:
    """The draft graphs' precision: as asked, else FP16 for an FP16 or INT8 target (the drafter is a few percent of
    the target's work; INT8-calibrating it is not worth a second calibration set), else FP32."""
    if opts.draft_float is not None:
        if opts.draft_float not in ("fp32", "fp16"):
            raise DreamExportError(f"draft graph precision {opts.draft_float!r}: expected fp32 or fp16")
        return opts.draft_float
    return "fp16" if opts.precision in ("fp16", "int8") else "fp32"


def _export_draft_tree(drafter, embed_weight, drafter_spec_, tree: TreeSpec, folder: Path, stages, seed: int,
                       precision: str = "fp32", graph_precision: str = "fp32", embed_scale: float = 1.0):
    """The one-call draft graph (checked against the HF-module drafter; FP16 when ``graph_precision`` says so, then
    checked against its FP32 graph) and, for int8/int4, its ORT-CPU quantized twin (checked against the float
    graph). Returns ([specs], checks)."""
    from .cpu_draft_tree import unsupported as written_draft_unsupported
    from .draft_tree import DraftTreeGraph, draft_tree_spec, quantized_tree_spec, validate_draft_tree, validate_quantized_tree
    from .drafter_export import drafter_dummy
    from .quantize import PRECISIONS, quantize_matmuls

    from ..drafter.exported import ExportedDrafter

    if precision not in PRECISIONS:
        raise DreamExportError(f"draft precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    t_spec = draft_tree_spec(drafter_spec_, tree.depth, tree.top_k)
    mask_min = drafter_spec_.extra["mask_min"]
    exported = DraftTreeGraph(ExportedDrafter(drafter), embed_weight, tree.depth, tree.top_k, mask_min, embed_scale).eval()
    reference = DraftTreeGraph(drafter, embed_weight, tree.depth, tree.top_k, mask_min, embed_scale).eval()
    with stages.stage(f"draft step in one graph (catch-up + depth {tree.depth}, top-{tree.top_k} tree) → {t_spec.file}"):
        export_graph(exported, t_spec, drafter_dummy(drafter.config, drafter.past_shapes()), folder / t_spec.file)
    with stages.stage(f"check {t_spec.file} against the PyTorch drafter (prompt catch-up, step catch-up)"):
        checks = validate_draft_tree(reference, drafter.config, t_spec, folder / t_spec.file, seed)
    if PRECISIONS[precision]:
        q_spec = quantized_tree_spec(t_spec, precision)
        if written_draft_unsupported(drafter) is None:
            checks += _written_draft_tree(drafter, embed_weight, embed_scale, reference, t_spec, q_spec, folder, stages, seed)
        else:
            with stages.stage(f"{precision} weights (MatMulNBits, ORT-CPU only) → {q_spec.file}"):
                quantize_matmuls(folder / t_spec.file, folder / q_spec.file, PRECISIONS[precision])
            with stages.stage(f"check {q_spec.file} against {t_spec.file}"):
                checks += validate_quantized_tree(drafter.config, t_spec, folder / t_spec.file, q_spec, folder / q_spec.file,
                                                  seed)
    specs = [t_spec]
    if graph_precision == "fp16":  # after the CPU twin, which quantizes the float graph
        from .draft_tree import tree_cases

        t_spec, c = fp16_graph(t_spec, folder, tree_cases(drafter.config, t_spec, seed), stages)
        checks += c
        specs = [t_spec]
    if PRECISIONS[precision]:
        specs.append(q_spec)
    return specs, checks


def _written_draft_tree(drafter, embed_weight, embed_scale: float, reference, t_spec, q_spec, folder: Path, stages,
                        seed: int) -> list:
    """The ORT-CPU draft graph written node by node (``cpu_draft_tree``): built at fp32 and checked against the PyTorch
    drafter, then at ``q_spec``'s precision into ``folder`` and checked against that fp32 build."""
    import tempfile

    from .cpu_draft_tree import build_cpu_draft_tree, drafter_weights
    from .draft_tree import validate_draft_tree, validate_quantized_tree
    from .quantize import PRECISIONS

    precision = q_spec.extra["precision"]
    w = drafter_weights(drafter, embed_weight, embed_scale)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".cpu-draft-tree-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        with stages.stage(f"written ORT-CPU draft graph (packed projections, GroupQueryAttention, fused norms) at fp32, "
                          f"checked against the PyTorch drafter"):
            build_cpu_draft_tree(w, t_spec, float_path, None)
            checks = validate_draft_tree(reference, drafter.config, t_spec, float_path, seed, graph="draft_tree_ort_cpu_fp32")
        with stages.stage(f"{precision} weights, int8 compute (MatMulNBits) → {q_spec.file}; checked against the fp32 build"):
            build_cpu_draft_tree(w, q_spec, folder / q_spec.file, PRECISIONS[precision])
            checks += validate_quantized_tree(drafter.config, t_spec, float_path, q_spec, folder / q_spec.file, seed)
    return checks


def set_draft_tree(bundle_dir: Path, model, processor, drafter_dir: Path, tree: TreeSpec, quiet: bool = True) -> Path:
    """Replace a bundle's one-call draft graph with one for ``tree``'s depth and top-k and make ``tree`` the
    bundle's tree (``dream-export --tune`` uses it when it picks another D or K). The new graph gets its
    own file name (validated in a temporary folder, then moved in); the manifest switches to it in one
    atomic replace and only then is the old graph file removed, so the bundle is valid at every moment."""
    from ..drafter.released import load_any
    from ..targets import adapter_for
    from .specs import GraphSpec, TensorSpec

    bundle_dir = Path(bundle_dir)
    stages = _Stages([], quiet=quiet)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    if not manifest.get("drafter"):
        raise DreamExportError(f"{bundle_dir}: the bundle has no drafter")
    adapter = adapter_for(model, processor)
    drafter = load_any(drafter_dir, adapter.lm_head().weight)
    g = manifest["graphs"]["drafter"]
    base = GraphSpec("drafter", g["file"], tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["inputs"]),
                     tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["outputs"]), g["atol"],
                     {k: g[k] for k in ("past", "present", "mask_min")})
    precision = manifest["drafter"].get("draft_precision") or "fp32"
    graph_precision = manifest["drafter"].get("graph_precision") or "fp32"
    replaced = []  # (new file, old file)
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=".draft-tree-") as tmp:
        specs, checks = _export_draft_tree(drafter, adapter.embed_tokens().weight, base, tree, Path(tmp), stages, 0, precision,
                                           graph_precision, adapter.embed_scale())
        raise_on_mismatch(checks)
        stores = _draft_tree_stores(bundle_dir, manifest, Path(tmp), specs)
        entries = {}
        try:
            for spec in specs:
                entries[spec.name] = _inventory_checked(spec, Path(tmp))
                entries[spec.name]["external_data"] = sorted(externalize(Path(tmp) / spec.file, stores))
        finally:
            for store in stores:
                store.close()
        for spec in specs:
            entry = entries[spec.name]
            for blob in entry["external_data"]:
                if (Path(tmp) / blob).is_file():  # a new blob (weights the bundle did not hold yet)
                    os.replace(Path(tmp) / blob, bundle_dir / blob)
                    manifest["files"][blob] = sha256_file(bundle_dir / blob)
            os.replace(Path(tmp) / spec.file, bundle_dir / spec.file)
            old_entry = manifest["graphs"].get(spec.name, {})
            replaced.append((spec.file, old_entry.get("file"), set(old_entry.get("external_data", [])) - {WEIGHTS_FILE}))
            manifest["graphs"][spec.name] = entry
            manifest["files"][spec.file] = sha256_file(bundle_dir / spec.file)
    manifest["tree"] = tree.to_json()
    still_used = {b for g in manifest["graphs"].values() for b in g.get("external_data", [])}
    stale = set()
    for new_file, old, old_blobs in replaced:
        if old and old != new_file:
            stale.add(old)
        stale |= old_blobs - still_used
    for name in stale:
        manifest["files"].pop(name, None)
    part = bundle_dir / (MANIFEST + ".part")
    part.write_text(json.dumps(manifest, indent=1))
    os.replace(part, bundle_dir / MANIFEST)
    for name in stale:
        (bundle_dir / name).unlink(missing_ok=True)
    return bundle_dir


def _draft_tree_stores(bundle_dir: Path, manifest: dict, tmp: Path, specs) -> list:
    """Where a re-exported draft graph's weights go: the bundle's weights.bin when it already holds them (the
    target's embeddings and head, the drafter's layers), else a new blob beside the graph."""
    from .weights import WeightFile

    stores = []
    if (bundle_dir / WEIGHTS_FILE).is_file():
        readers = [g["file"] for g in manifest["graphs"].values() if WEIGHTS_FILE in g.get("external_data", [])]
        stores.append(WeightFile.indexed(bundle_dir, WEIGHTS_FILE, readers))
    stores.append(WeightFile(tmp, specs[0].file[: -len(".onnx")] + ".weights"))
    return stores


def _decoder_dummy(spec, past_len: int, q_len: int, capacity: int | None = None) -> tuple:
    kv = spec.extra["kv"]
    hidden = spec.inputs[0].dims[2]
    positions = torch.arange(past_len, past_len + q_len)[None]
    if spec.extra.get("rope_axes", 1) == 3:  # M-RoPE: [3, 1, Q], the axes apart
        positions = torch.stack([positions, positions + 1, positions + 2])
    args = [
        torch.randn(1, q_len, hidden),
        torch.zeros(1, 1, q_len, past_len + q_len),
        positions,
    ]
    rows = capacity if capacity is not None else past_len
    # the fused graph's shared buffers are [1,kvh,capacity,hd]; the decoder's past is [1,P,kvh,hd] ("bshd")
    shape = (1, kv["kv_heads"], rows, kv["head_dim"]) if capacity is not None else (1, rows, kv["kv_heads"], kv["head_dim"])
    for _ in range(kv["num_layers"]):
        args += [torch.randn(*shape) for _ in range(2)]
    return tuple(args)


def _print_checks(stages, checks) -> None:
    """Max abs diff per output; the K/V outputs of one graph and case are summarised in one line."""
    groups: dict = {}
    for c in checks:
        key = (c.graph, c.case, "present_* (K/V)" if c.output.startswith("present_") else c.output)
        groups.setdefault(key, []).append(c)
    for (graph, case, output), cs in groups.items():
        worst = max(cs, key=lambda c: c.max_abs_diff)
        n = f" ({len(cs)} outputs)" if len(cs) > 1 else ""
        top1 = [c.argmax_agreement for c in cs if c.argmax_agreement is not None]
        agree = f", top-1 agreement {min(top1):.0%}" if top1 else ""
        what = "relative L2 error" if cs[0].output.endswith("(relative L2 error)") else "max abs diff"
        stages.print(f"    {graph}/{case}/{output}{n}: {what} {worst.max_abs_diff:.2e}{agree}"
                     + ("" if all(c.ok for c in cs) else "  [red]FAIL[/]"))
