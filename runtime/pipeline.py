"""``Pipeline``: the public API. Bundle -> preprocessing -> prefill -> decode loop, torch-free."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .backends import make_backend
from .bundle import Bundle
from .chat import render, user_turn
from .context import Context
from .errors import BundleError, InputError
from .decoder import make_decoder, written_cpu_graphs
from .runner import DecoderRunner
from .preprocess import as_image, make_preprocessor
from .sampling import SamplingConfig, choose
from .token_rows import TokenRows
from .tree import TreeSpec, causal_mask, image_block_mask
from .video import Video, is_video_path


@dataclass
class Prepared:
    input_ids: np.ndarray          # [S] int64
    tiles: list[np.ndarray]        # one [T,3,S,S] per image
    images: list = field(default_factory=list)  # preprocess.ProcessedImage per image (what packing needs)


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    decode_s: float = 0.0
    accept_lengths: list[int] | None = None   # tokens emitted per target call (speculative decoding only)
    speculative: bool = False
    cached_tokens: int = 0     # prompt tokens whose K/V were reused from earlier calls (sessions)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput after the first token (the prefill is in ttft_ms)."""
        n = self.num_new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "num_new_tokens": self.num_new_tokens,
            "stop_reason": self.stop_reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": round(self.ttft_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "speculative": self.speculative,
            **({"mean_accept_length": round(float(np.mean(self.accept_lengths)), 4) if self.accept_lengths else 0.0,
                "accept_lengths": self.accept_lengths} if self.accept_lengths is not None else {}),
        }


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
        self._lock = threading.RLock()  # one call at a time (see stream_chat)
        self._reusable = None  # (image fingerprints, Context) of the last stream_chat(reuse=True)
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
        from .decoder import FusedOrtDecoder
        from .speculative import tree_graph_for
        from .tree import TreeSpec

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
        return self._encode(text, images, bgr, image_splitting, longest_edge)

    def _encode(self, text: str, images: list, bgr: bool, image_splitting, longest_edge, check: bool = True) -> Prepared:
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
        mask = None if dec.tree_native else causal_mask(q, p, self.mask_min)
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
        return _last(self.stream(images, prompt, max_new_tokens, temperature, top_p, seed, speculative, bgr, **options))

    def stream(self, images, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
               bgr: bool = False, system: str | None = None, **options) -> Iterator["StreamEvent"]:
        """Yield text pieces as they become printable; the last event carries the full result.

        ``images``: file paths, PIL images or numpy frames (H x W x 3 uint8 RGB; ``bgr=True`` for OpenCV / ROS
        ``bgr8`` frames), a list or a single one; empty or None answers text-only. ``system``: a system message.
        ``speculative=None`` uses DREAM speculative decoding whenever the bundle has a drafter. Further options
        (``stream_chat``): ``deadline_s``, ``stop``, ``cancel``, ``image_splitting``, ``longest_edge``."""
        messages = ([{"role": "system", "content": system}] if system else []) + user_message(images, prompt)
        return self.stream_chat(messages, max_new_tokens, temperature, top_p, seed, speculative, bgr, **options)

    def chat(self, messages: list[dict], **kwargs) -> GenerationResult:
        """The next assistant turn of a whole conversation (see ``stream_chat``)."""
        return _last(self.stream_chat(messages, **kwargs))

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
                    bgr: bool = False, deadline_s: float | None = None, stop=None, cancel=None,
                    image_splitting: bool | None = None, longest_edge: int | None = None,
                    reuse: bool = False) -> Iterator["StreamEvent"]:
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
        opts = _Options.make(max_new_tokens, temperature, top_p, seed, speculative, deadline_s, stop, cancel, self,
                             bool(normalize_messages(messages)[1]))
        with self._lock:
            t0 = time.perf_counter()
            prep = self.prepare_messages(messages, bgr, image_splitting, longest_edge)
            if reuse:
                import hashlib

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
            yield from self._decode(ctx, prep.input_ids, opts, t0)

    def session(self, images=None, system: str | None = None, bgr: bool = False, image_splitting: bool | None = None,
                longest_edge: int | None = None) -> "Session":
        """A conversation about fixed image(s): vision and the prompt's image prefix run once, here; every
        ``ask`` then computes only its own tokens (see ``Session``)."""
        return Session(self, images, system, bgr, image_splitting, longest_edge)

    def _decode(self, ctx: Context, ids: np.ndarray, opts: "_Options", t0: float) -> Iterator["StreamEvent"]:
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
        detok = _Detokenizer(self.tokenizer, opts.stop)
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
        from .speculative import SpeculativeDecoder

        tree = self.tree_spec or TreeSpec.from_json(self.bundle.manifest["tree"])
        spec = SpeculativeDecoder(self, tree, cfg, rng, unrolled=self.unrolled_draft, ctx=ctx)
        yield spec.begin(logits)
        while True:
            step = spec.step()
            res.accept_lengths.append(len(step.tokens))
            yield from step.tokens


class Session:
    """A conversation about fixed image(s), keeping the K/V of everything already computed.

    Created by ``Pipeline.session``: the images go through vision once and the prompt up to the first question
    (system message, user turn header, image tokens) is prefilled once. ``ask(prompt)`` renders the whole
    conversation with the model's chat template, keeps the longest cached prefix of its tokens and computes
    only the rest, so its answer is the one ``Pipeline.chat`` gives for the same conversation (tested token for
    token). ``keep=True`` (default) adds the question and answer to the conversation (multi-turn); ``keep=False``
    rolls back to the state before the question (many independent questions about one frame). The drafter's
    caches follow the same rule. A conversation that no longer fits the context gets an ``InputError`` naming
    its length; ``reset()`` drops every turn but keeps the image prefix."""

    def __init__(self, pipe: Pipeline, images=None, system: str | None = None, bgr: bool = False,
                 image_splitting: bool | None = None, longest_edge: int | None = None):
        self.pipe = pipe
        self.images = [as_image(im, i, bgr) for i, im in enumerate(_image_list(images))]
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (question, answer) kept
        self._vision = (image_splitting, longest_edge)
        self._busy = False
        with pipe._lock:
            self.ctx = pipe.new_context()
            sentinel = "\x00dream-export-question\x00"
            shown, images = normalize_messages(self._messages(sentinel))
            text = pipe.render(shown, add_generation_prompt=False)
            if text.count(sentinel) != 1:
                raise InputError("the chat template does not render the question verbatim; sessions need it to")
            prep = pipe._encode(text.split(sentinel)[0], images, False, *self._vision)
            self.ctx.set_images(pipe.vision(prep.tiles, prep.images), prep.images)
            self.prefix_tokens = len(prep.input_ids)
            if self.prefix_tokens:
                self.ctx.prefill(prep.input_ids)

    def _messages(self, prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i, (q, a) in enumerate(self.turns):
            msgs += user_message(self.images if i == 0 else None, q)
            msgs.append({"role": "assistant", "content": a})
        return msgs + user_message(self.images if not self.turns else None, prompt)

    def messages(self, prompt: str) -> list[dict]:
        """The whole conversation that ``ask(prompt)`` answers (what ``Pipeline.chat`` would be given)."""
        return self._messages(prompt)

    @property
    def length(self) -> int:
        """Tokens whose K/V the session holds."""
        return self.ctx.length

    def ask(self, prompt: str, keep: bool = True, **kwargs) -> GenerationResult:
        return _last(self.stream(prompt, keep, **kwargs))

    def stream(self, prompt: str, keep: bool = True, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
               deadline_s: float | None = None, stop=None, cancel=None) -> Iterator["StreamEvent"]:
        """As ``Pipeline.stream_chat`` over ``messages(prompt)``. A stream closed before its last event keeps
        nothing of that turn, whatever ``keep`` says."""
        pipe = self.pipe
        opts = _Options.make(max_new_tokens, temperature, top_p, seed, speculative, deadline_s, stop, cancel, pipe,
                             bool(self.images))
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty; expected a question or instruction")
        with pipe._lock:
            if self._busy:
                raise InputError("this session is already answering (a stream is open); finish or close it first")
            self._busy = True
            try:
                t0 = time.perf_counter()
                shown, images = normalize_messages(self._messages(prompt))
                text = pipe.render(shown)
                ids = pipe._encode(text, images, False, *self._vision, check=False).input_ids
                if len(ids) >= pipe.max_positions:
                    raise InputError(f"the conversation is {len(ids)} tokens with this question; the context is "
                                     f"{pipe.max_positions}: ask with keep=False, reset() or start a new session")
                before = min(self.ctx.common_prefix(ids), len(ids) - 1)
                final = None
                try:
                    for event in pipe._decode(self.ctx, ids, opts, t0):
                        final = event.final
                        yield event
                finally:
                    if final is not None and keep:
                        self.turns.append((prompt, final.text))
                    else:  # rolled back: the question, the answer and anything an early close left behind
                        self.ctx.truncate(before)
            finally:
                self._busy = False

    def reset(self) -> None:
        """Forget every turn; the image prefix stays cached."""
        self.turns.clear()
        self.ctx.truncate(self.prefix_tokens)


@dataclass
class _Options:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    speculative: bool
    deadline_s: float | None
    stop: tuple[str, ...]
    cancel: object

    @classmethod
    def make(cls, max_new_tokens, temperature, top_p, seed, speculative, deadline_s, stop, cancel, pipe,
             has_images: bool) -> "_Options":
        """Validated before anything runs: each bad value gets one line naming it and what is expected."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens {max_new_tokens!r}: expected an integer of at least 1")
        try:
            SamplingConfig(temperature, top_p, seed)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        if speculative is None:
            speculative = pipe.speculative_for(has_images)
        elif speculative and not pipe.has_drafter:
            raise InputError(f"{pipe.bundle.path}: this bundle has no drafter; export with --drafter to decode speculatively")
        if deadline_s is not None and not (isinstance(deadline_s, (int, float)) and deadline_s > 0):
            raise InputError(f"deadline_s {deadline_s!r}: expected a positive number of seconds")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise InputError(f"stop {stop!r}: expected a non-empty string or a list of them")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise InputError(f"cancel: a {type(cancel).__name__}; expected a threading.Event (or anything with is_set())")
        return cls(max_new_tokens, temperature, top_p, seed, bool(speculative), deadline_s, stops, cancel)


def _last(events):
    result = None
    for event in events:
        result = event
    return result.final


def user_message(images, prompt: str) -> list[dict]:
    """One user turn as a message list: the images (and video files, by their suffix) first, then the text
    (SmolVLM's layout)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; expected a question or instruction about the image(s)")
    parts = [{"type": "video", "video": im} if is_video_path(im) else {"type": "image", "image": im}
             for im in _image_list(images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def normalize_messages(messages) -> tuple[list[dict], list]:
    """(messages as the chat template takes them, the images in order). Content may be a string or a list of
    text / image parts; image parts carry the image under ``"image"``."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {'role', 'content'} dicts")
    shown, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}]: expected a dict with role 'system', 'user' or 'assistant' and a content")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise InputError(f"messages[{i}].content: expected a string or a non-empty list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image" and part.get("image") is not None:
                parts.append({"type": "image"})
                images.append(part["image"])
            elif kind == "video" and isinstance(part.get("video"), (str, Path)):
                parts.append({"type": "video"})
                images.append(Video(Path(part["video"])))
            else:
                raise InputError(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}}, "
                                 f"{{'type': 'image', 'image': path | PIL image | numpy array}} or "
                                 f"{{'type': 'video', 'video': path}}")
        shown.append({"role": m["role"], "content": parts})
    return shown, images


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getbands"):
        return [images]  # one image
    return list(images)


@dataclass
class StreamEvent:
    text: str
    final: GenerationResult | None  # set on the last event only


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character, nor text that may turn out to begin a stop
    string (it is held back until it cannot)."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.emitted_text = ""
        self.stopped = False
        self._cut: str | None = None

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def final_text(self) -> str:
        return self._cut if self._cut is not None else self.text()

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted_text):
            return ""
        safe = len(text)
        if self.stops:
            hits = [i for i in (text.find(s, max(0, len(self.emitted_text) - len(s))) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                self._cut = text[: min(hits)]
                return ""
            for s in self.stops:  # hold back a tail that is the start of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        safe = max(safe, len(self.emitted_text))
        piece = text[len(self.emitted_text):safe]
        self.emitted_text = text[:safe]
        return piece
