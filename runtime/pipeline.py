"""``Pipeline``: the public API. Bundle -> preprocessing -> prefill -> decode loop, torch-free. A conversation about
fixed images that keeps its K/V is a ``session.Session``; what one call takes and gives is in ``generation``."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .backends import make_backend
from .bundle import Bundle
from .chains import ChainDecoder
from .chat import render, user_turn
from .context import Context
from .decoder import FusedOrtDecoder, make_decoder, written_cpu_graphs
from .drafter import tree_graph_for
from .errors import BundleError, InputError
from .generation import DecodeOptions, Detokenizer, GenerationResult, StreamEvent, final_result
from .messages import normalize_messages, user_message
from .preprocess import as_image, make_preprocessor
from .runner import DecoderRunner
from .sampling import SamplingConfig, choose
from .session import Session
from .speculative import SpeculativeDecoder
from .token_rows import TokenRows
from .tree import TreeSpec, causal_mask, image_block_mask
from .video import Video


@dataclass
class Prepared:
    input_ids: np.ndarray          # [S] int64
    tiles: list[np.ndarray]        # one [T,3,S,S] per image
    images: list = field(default_factory=list)  # preprocess.ProcessedImage per image (what packing needs)


class Pipeline:
    """Loading creates every ONNX Runtime session the default decoding path uses (``warm``), so that
    ``ttft_ms`` and ``tokens_per_s`` never include setup; ``load_ms`` is that setup (manifest, sha256 checks,
    sessions). ``speculative_for(has_images)`` is what ``generate(speculative=None)`` does: decode with the
    drafter unless the bundle has none or its manifest records that speculation measured slower on this machine
    for that kind of prompt (``dream-export --tune``, or the measurement shipped with a built-in drafter)."""

    def __init__(self, bundle: Bundle, backend: str = "auto", threads: int | None = None, fused: bool | None = None,
                 warm: bool = True, _t0: float | None = None, context: int | None = None):
        t0 = time.perf_counter() if _t0 is None else _t0
        m = bundle.manifest
        self.bundle = bundle
        if threads is None:  # dream-export --tune measured the best thread count on this machine
            threads = (m.get("runtime") or {}).get("threads")
        self.backend = make_backend(bundle, backend, threads)
        arrays = {name: np.asarray(bundle.array(entry)) for name, entry in (m.get("arrays") or {}).items()}
        self.pre = make_preprocessor(m["preprocessing"], arrays)
        self.tokenizer = Tokenizer.from_file(str(bundle.file(m["tokenizer"]["file"])))
        self.text = m["text"]
        self.mask_min = float(m["graphs"].get("decoder", {}).get("mask_min", -1e4))
        self.stop_ids = set(m["special_tokens"]["stop_token_ids"])
        self.image_token_id = int(m["special_tokens"]["image_token_id"])
        self.max_positions = int(self.text["max_positions"])
        self.embed_scale = np.float32(self.text.get("embed_scale", 1.0))
        self.image_attention = self.text.get("image_attention", "causal")
        self.rope_axes = int(self.text.get("rope_axes", 1))  # 3: M-RoPE positions (runtime/rope.py)
        if self.image_attention not in ("causal", "bidirectional"):
            raise InputError(f"manifest text.image_attention {self.image_attention!r}: expected causal or bidirectional")
        if context is not None:  # a shorter context preallocates less K/V (runtime/budget.py: Jetson budgets)
            if not 2 <= int(context) <= self.max_positions:
                raise InputError(f"context {context}: expected 2..{self.max_positions} positions (the model's maximum)")
            self.max_positions = int(context)
        if fused is None and m.get("precision", "fp32") != "fp32":
            fused = False  # an FP16 / INT8 bundle runs its own graphs (the fused ORT-CPU decoder is FP32)
        self.fused = fused
        self.written_cpu = bool(written_cpu_graphs(bundle)) and self.backend.ort_cpu and fused is not False
        if not self.written_cpu and not m.get("embeddings"):
            raise BundleError(f"{bundle.path}: a CPU-only bundle (no float graphs for other backends); its written "
                              f"ORT-CPU decoder runs only on ONNX Runtime's CPU provider (--backend ort-cpu), not on "
                              f"{self.backend.name}" + (" with fused=False" if fused is False else ""))
        self.embeddings = TokenRows(bundle, m["embeddings_cpu"] if self.written_cpu else m["embeddings"])
        self.tree_spec = None  # override the manifest's TreeSpec (benchmarks, tuning)
        self.unrolled_draft: bool | None = None  # None: the one-call draft_tree graph when it fits the tree
        self.lock = threading.RLock()  # one call at a time (see stream_chat); a Session holds it too
        self._reusable = None  # (image fingerprints, Context) of the last stream_chat(reuse=True)
        # written-graph decoders run a lone row beside a copy of itself (ChainDecoder.pad_single): None asks this CPU
        # once, at the first decoder (ChainDecoder.lone_row_differs); True / False decide (benchmarks of its cost)
        self.pad_lone_rows: bool | None = None
        runtime_cfg = m.get("runtime") or {}
        mode = runtime_cfg.get("speculative", True)  # a bool, or per prompt kind: {"text": bool, "image": bool}
        mode = mode if isinstance(mode, dict) else {"text": mode, "image": mode}
        self.speculative_modes = {k: self.has_drafter and bool(mode.get(k, True)) for k in ("text", "image")}
        self.speculative_default = any(self.speculative_modes.values())  # the drafter's sessions are made at load
        self.speculative_note = runtime_cfg.get("speculative_note") if self.has_drafter else None
        if warm:
            self.warm()
        self.load_ms = (time.perf_counter() - t0) * 1000

    def graphs_in_use(self, speculative: bool | None = None) -> list[str]:
        """The graphs a call with these settings runs (images included)."""
        graphs = self.bundle.manifest["graphs"]
        fused = (self.fused is True) if self.fused is not None else (FusedOrtDecoder.GRAPH in graphs and self.backend.ort_cpu)
        if self.written_cpu:
            names = ["vision", *written_cpu_graphs(self.bundle).values()]
        else:
            names = ["vision", FusedOrtDecoder.GRAPH if fused else "decoder"]
        if self.speculative_default if speculative is None else speculative:
            tree = self.tree_spec or TreeSpec.from_json(self.bundle.manifest["tree"])
            tg = tree_graph_for(self.backend, self.bundle.manifest)
            g = graphs.get(tg or "", {})
            one_call = bool(g) and (g.get("depth"), g.get("top_k")) == (tree.depth, tree.top_k) and self.unrolled_draft is not False
            names.append(tg if one_call else self.bundle.manifest["drafter"]["graph"])
        return names

    def speculative_for(self, has_images: bool) -> bool:
        """What ``speculative=None`` means for a prompt with or without images (the manifest's measured choice)."""
        return self.speculative_modes["image" if has_images else "text"]

    def warm(self, speculative: bool | None = None) -> None:
        """Create the sessions of ``graphs_in_use`` now (idempotent)."""
        for graph in self.graphs_in_use(speculative):
            self.backend.open(graph)

    @classmethod
    def from_bundle(cls, path, backend: str = "auto", threads: int | None = None, verify: bool = True,
                    fused: bool | None = None, warm: bool = True, context: int | None = None) -> "Pipeline":
        """``fused=None`` picks the fused ORT-CPU decoder when the bundle has one and the backend is ORT on a CPU;
        ``fused="device"`` keeps K/V resident in the backend's memory (the GPU path's decoder; on the CPU, its test)."""
        t0 = time.perf_counter()
        return cls(Bundle.load(Path(path), verify=verify), backend=backend, threads=threads, fused=fused, warm=warm, _t0=t0,
                   context=context)

    # --- inputs -----------------------------------------------------------------------------------
    def prompt_text(self, num_images: int, prompt: str) -> str:
        return self.render(user_turn(num_images, prompt))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The model's chat template over ``messages``, with the special tokens transformers passes to it (for a
        conversation with a video, the template transformers' processor uses for videos when the family has one)."""
        m = self.bundle.manifest
        template = m["chat_template"]
        has_video = any(isinstance(c, dict) and c.get("type") == "video"
                        for msg in messages if isinstance(msg.get("content"), list) for c in msg["content"])
        if has_video:
            template = (m["preprocessing"].get("video") or {}).get("chat_template") or template
        return render(template, messages, add_generation_prompt, m.get("chat_template_vars"))

    def prepare(self, images, prompt: str, bgr: bool = False, image_splitting: bool | None = None,
                longest_edge: int | None = None) -> Prepared:
        """``images``: a list (or one) of file paths, PIL images or numpy frames (H x W x 3 uint8, RGB; BGR with
        ``bgr=True``); empty or None for a text-only prompt."""
        return self.prepare_messages(user_message(images, prompt), bgr, image_splitting, longest_edge)

    def prepare_messages(self, messages: list[dict], bgr: bool = False, image_splitting: bool | None = None,
                         longest_edge: int | None = None, add_generation_prompt: bool = True) -> Prepared:
        """A conversation (``messages``: role + content, content a string or a list of ``{"type": "text", "text"}``
        / ``{"type": "image", "image": path | PIL image | numpy frame}`` parts) -> token ids and image tiles."""
        shown, images = normalize_messages(messages)
        text = self.render(shown, add_generation_prompt)
        return self.encode(text, images, bgr, image_splitting, longest_edge)

    def encode(self, text: str, images: list, bgr: bool, image_splitting, longest_edge, check: bool = True) -> Prepared:
        """Rendered chat text and its images (in prompt order) -> token ids and image tiles; ``check``: refuse a
        prompt that does not fit the context."""
        processed = []
        for i, im in enumerate(images):
            if isinstance(im, Video):
                if not hasattr(self.pre, "video"):
                    raise InputError(f"{im.path}: this model takes images, not videos")
                processed.append(self.pre.video(im.path))
            else:
                processed.append(self.pre.image(as_image(im, i, bgr), image_splitting, longest_edge))
        text = self.pre.expand_prompt(text, processed)
        add_special = bool(self.bundle.manifest["preprocessing"].get("add_special_tokens", True))
        ids = np.array(self.tokenizer.encode(text, add_special_tokens=add_special).ids, dtype=np.int64)
        if check and len(ids) >= self.max_positions:
            raise InputError(
                f"the prompt is {len(ids)} tokens (images included); the model's context is {self.max_positions}: "
                f"shorten the prompt or use fewer/smaller images"
            )
        return Prepared(ids, [p.tiles for p in processed], processed)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        rows = self.embeddings[np.asarray(ids, np.int64)]
        return rows * self.embed_scale if self.embed_scale != 1 else rows

    def vision(self, tiles: list[np.ndarray], images: list | None = None) -> np.ndarray | None:
        """[n_image_tokens, H]: the embeddings the image tokens stand for, in prompt order (None without images).
        A family whose image tokens are not the tiles' outputs in order (LLaVA-NeXT: unpadding, row ends) packs
        each image's tile outputs with its preprocessor's ``pack``."""
        if not tiles:
            return None
        if self.pre.cfg.get("vision_call") == "per_image":  # each image at its own size (Pixtral): a call each
            feeds = [getattr(img, "feeds", None) or {} for img in (images or [None] * len(tiles))]
            outs = [self.backend.run("vision", {"pixel_values": t, **f})["image_embeds"] for t, f in zip(tiles, feeds)]
            return np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs], axis=0)
        image_embeds = self.backend.run("vision", {"pixel_values": np.concatenate(tiles, axis=0)})["image_embeds"]
        pack = getattr(self.pre, "pack", None)
        if pack is None or not images:
            return image_embeds.reshape(-1, image_embeds.shape[-1])
        out, start = [], 0
        for t, img in zip(tiles, images):
            out.append(pack(image_embeds[start:start + len(t)], img))
            start += len(t)
        return np.concatenate(out, axis=0)

    def prompt_embeds(self, prep: Prepared) -> np.ndarray:
        embeds = self.embed(prep.input_ids)  # [S,H]
        flat = self.vision(prep.tiles, prep.images)
        if flat is not None:
            slots = np.flatnonzero(prep.input_ids == self.image_token_id)
            if len(slots) != len(flat):
                raise InputError(f"{len(slots)} image tokens in the prompt but {len(flat)} image embeddings")
            embeds[slots] = flat
        return embeds[None]

    # --- the target graph -------------------------------------------------------------------------
    def new_decoder(self, slack: int = 0) -> DecoderRunner:
        """A decoder with a fresh cache for one sequence; ``slack`` extra rows hold a draft tree at the end."""
        dec = make_decoder(self.backend, self.bundle, self.max_positions + slack, self.fused)
        if isinstance(dec, ChainDecoder):  # exactness on CPUs whose int8 kernels compute a lone row their own way
            if self.pad_lone_rows is None:
                self.pad_lone_rows = dec.lone_row_differs(self.embed(np.array([min(self.stop_ids)]))[0])
            dec.pad_single = self.pad_lone_rows
        if self.has_drafter and float(self.bundle.manifest["drafter"].get("keep_visual", 1.0)) < 1.0:
            dec.track_attention = True  # visual token compression ranks image tokens by the attention they receive
        return dec

    def new_context(self) -> Context:
        """A fresh sequence state, with room for a draft tree when the bundle has a drafter."""
        slack = (self.tree_spec or TreeSpec.from_json(self.bundle.manifest["tree"])).total_tokens if self.has_drafter else 0
        return Context(self, slack)

    def step(self, dec: DecoderRunner, embeds: np.ndarray, ids: np.ndarray | None = None, logits: str = "all") -> dict:
        """Causal call over Q new positions, all kept. ``ids`` (the Q token ids) let a family whose image tokens
        attend to each other (``image_attention == "bidirectional"``, Gemma 3) open each image's block.
        ``logits="last"``: only the last position's logits are read (a runner may compute only those)."""
        q = embeds.shape[1]
        p = dec.length
        mask = causal_mask(q, p, self.mask_min) if dec.reads_mask else None
        if mask is not None and ids is not None and self.image_attention == "bidirectional" and q > 1:
            mask = image_block_mask(mask, ids == self.image_token_id, p)
        out = dec.run(embeds, mask, np.arange(p, p + q), logits=logits)
        dec.commit()
        return out

    def image_block_start(self, ids: np.ndarray, c: int) -> int:
        """Where a prefill from position ``c`` must start so no image block is split (bidirectional families:
        the block's first rows must see its last ones); ``c`` for causal families."""
        if self.image_attention != "bidirectional":
            return c
        while 0 < c < len(ids) and ids[c] == self.image_token_id and ids[c - 1] == self.image_token_id:
            c -= 1
        return c

    # --- generation -------------------------------------------------------------------------------
    def generate(self, images, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
                 bgr: bool = False, **options) -> GenerationResult:
        """One answer (see ``stream`` for the arguments)."""
        return final_result(self.stream(images, prompt, max_new_tokens, temperature, top_p, seed, speculative, bgr, **options))

    def stream(self, images, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
               bgr: bool = False, system: str | None = None, **options) -> Iterator[StreamEvent]:
        """Yield text pieces as they become printable; the last event carries the full result.

        ``images``: file paths, PIL images or numpy frames (H x W x 3 uint8 RGB; ``bgr=True`` for OpenCV / ROS
        ``bgr8`` frames), a list or a single one; empty or None answers text-only. ``system``: a system message.
        ``speculative=None`` uses DREAM speculative decoding whenever the bundle has a drafter. Further options
        (``stream_chat``): ``deadline_s``, ``stop``, ``cancel``, ``image_splitting``, ``longest_edge``."""
        messages = ([{"role": "system", "content": system}] if system else []) + user_message(images, prompt)
        return self.stream_chat(messages, max_new_tokens, temperature, top_p, seed, speculative, bgr, **options)

    def chat(self, messages: list[dict], **kwargs) -> GenerationResult:
        """The next assistant turn of a whole conversation (see ``stream_chat``)."""
        return final_result(self.stream_chat(messages, **kwargs))

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
                    bgr: bool = False, deadline_s: float | None = None, stop=None, cancel=None,
                    image_splitting: bool | None = None, longest_edge: int | None = None,
                    reuse: bool = False) -> Iterator[StreamEvent]:
        """The next assistant turn of ``messages`` (see ``prepare_messages``), streamed.

        ``reuse=False`` (default) computes everything on a fresh context. ``reuse=True`` keeps the last reused
        call's context: when this call's images are the same pixels (after preprocessing) as that call's, their
        vision output and the longest common token prefix are reused, so a client that resends a growing
        conversation (as OpenAI-style chat clients do) pays only for the new turn; the answer is the same.

        Control: ``deadline_s`` stops with ``stop_reason == "time"`` once that many seconds have passed since the
        call began; ``stop`` (a string or a list) ends the answer before the first stop string, which is not
        returned (``"stop_string"``); ``cancel`` (a ``threading.Event`` or any object with ``is_set()``) stops at
        the next token once set (``"cancelled"``). Vision: ``image_splitting`` / ``longest_edge`` override the
        bundle's ``do_image_splitting`` / ``size["longest_edge"]``, as the processor's options of those names do.
        Closing the stream early (``close()``, ``break``) leaves the pipeline consistent. One pipeline serves
        several threads: calls take turns behind a lock, held from the first ``next()`` to the last event."""
        opts = DecodeOptions.make(max_new_tokens, temperature, top_p, seed, speculative, deadline_s, stop, cancel, self,
                             bool(normalize_messages(messages)[1]))
        with self.lock:
            t0 = time.perf_counter()
            prep = self.prepare_messages(messages, bgr, image_splitting, longest_edge)
            if reuse:
                key = tuple(hashlib.blake2b(np.ascontiguousarray(t).tobytes(), digest_size=16).hexdigest() for t in prep.tiles)
                key += tuple(getattr(i, "size", None) for i in prep.images)  # packing may depend on the original size
                if self._reusable is not None and self._reusable[0] == key:
                    ctx = self._reusable[1]
                else:
                    ctx = self.new_context()
                    ctx.set_images(self.vision(prep.tiles, prep.images), prep.images)
                    self._reusable = (key, ctx)
            else:
                ctx = self.new_context()
                ctx.set_images(self.vision(prep.tiles, prep.images), prep.images)
            yield from self.stream_on(ctx, prep.input_ids, opts, t0)

    def session(self, images=None, system: str | None = None, bgr: bool = False, image_splitting: bool | None = None,
                longest_edge: int | None = None) -> Session:
        """A conversation about fixed image(s): vision and the prompt's image prefix run once, here; every
        ``ask`` then computes only its own tokens (see ``Session``)."""
        return Session(self, images, system, bgr, image_splitting, longest_edge)

    def stream_on(self, ctx: Context, ids: np.ndarray, opts: DecodeOptions, t0: float) -> Iterator[StreamEvent]:
        """Prefill ``ids`` into ``ctx`` (only what it does not hold yet), then decode; yields ``StreamEvent``s."""
        cfg = SamplingConfig(opts.temperature, opts.top_p, opts.seed)
        rng = np.random.default_rng(opts.seed)
        res = GenerationResult(prompt_tokens=len(ids), speculative=opts.speculative)
        logits = ctx.prefill(ids)
        res.cached_tokens = len(ids) - ctx.last_prefill
        if opts.speculative:
            res.accept_lengths = []
            tokens = self._speculative_tokens(ctx, logits, cfg, rng, res)
        else:
            tokens = self._plain_tokens(ctx, logits, cfg, rng)
        detok = Detokenizer(self.tokenizer, opts.stop)
        t_first = None
        for token in tokens:
            res.token_ids.append(token)
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                res.ttft_ms = (t_first - t0) * 1000
            piece = detok.push(token)
            if token in self.stop_ids:
                res.stop_reason = "stop_token"
            elif detok.stopped:
                res.stop_reason = "stop_string"
            elif len(res.token_ids) >= opts.max_new_tokens:
                res.stop_reason = "max_new_tokens"
            elif res.prompt_tokens + len(res.token_ids) >= self.max_positions:  # the context is full
                res.stop_reason = "context_full"
            elif opts.deadline_s is not None and now - t0 >= opts.deadline_s:
                res.stop_reason = "time"
            elif opts.cancel is not None and opts.cancel.is_set():
                res.stop_reason = "cancelled"
            if res.stop_reason:
                res.decode_s = now - t_first
                res.text = detok.final_text()
                yield StreamEvent(piece + res.text[len(detok.emitted_text):], res)
                return
            if piece:
                yield StreamEvent(piece, None)

    @property
    def has_drafter(self) -> bool:
        return bool(self.bundle.manifest.get("drafter"))

    def _plain_tokens(self, ctx: Context, logits: np.ndarray, cfg: SamplingConfig, rng) -> Iterator[int]:
        while True:
            token = choose(logits, cfg, rng)
            yield token
            p = ctx.length
            out = self.step(ctx.dec, self.embed(np.array([token]))[None], logits="last")
            ctx.record(p, [token], out["hidden_states"][0])
            logits = out["logits"][0, -1]

    def _speculative_tokens(self, ctx: Context, logits: np.ndarray, cfg: SamplingConfig, rng,
                            res: GenerationResult) -> Iterator[int]:
        tree = self.tree_spec or TreeSpec.from_json(self.bundle.manifest["tree"])
        spec = SpeculativeDecoder(self, tree, cfg, rng, unrolled=self.unrolled_draft, ctx=ctx)
        yield spec.begin(logits)
        while True:
            step = spec.step()
            res.accept_lengths.append(len(step.tokens))
            yield from step.tokens
