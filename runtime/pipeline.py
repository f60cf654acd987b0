"""``Pipeline``: the public API. Bundle -> preprocessing -> prefill -> decode loop, torch-free."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .backends import make_backend
from .bundle import Bundle
from .chat import render, user_turn
from .errors import InputError
from .decoder import DecoderRunner, make_decoder
from .preprocess import as_image, make_preprocessor
from .sampling import SamplingConfig, choose
from .tree import causal_mask


@dataclass
class Prepared:
    input_ids: np.ndarray          # [S] int64
    tiles: list[np.ndarray]        # one [T,3,S,S] per image


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
            "ttft_ms": round(self.ttft_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "speculative": self.speculative,
            **({"mean_accept_length": round(float(np.mean(self.accept_lengths)), 4) if self.accept_lengths else 0.0,
                "accept_lengths": self.accept_lengths} if self.accept_lengths is not None else {}),
        }


class Pipeline:
    """Loading creates every ONNX Runtime session the default decoding path uses (``warm``), so that
    ``ttft_ms`` and ``tokens_per_s`` never include setup; ``load_ms`` is that setup (manifest, sha256 checks,
    sessions). ``speculative_default`` is what ``generate(speculative=None)`` does: decode with the drafter
    unless the bundle has none or its manifest records that speculation measured slower on this machine
    (``dream-export --tune``, or the measurement shipped with a built-in drafter)."""

    def __init__(self, bundle: Bundle, backend: str = "auto", threads: int | None = None, fused: bool | None = None,
                 warm: bool = True, _t0: float | None = None):
        t0 = time.perf_counter() if _t0 is None else _t0
        m = bundle.manifest
        self.bundle = bundle
        if threads is None:  # dream-export --tune measured the best thread count on this machine
            threads = (m.get("runtime") or {}).get("threads")
        self.backend = make_backend(bundle, backend, threads)
        self.pre = make_preprocessor(m["preprocessing"])
        self.tokenizer = Tokenizer.from_file(str(bundle.file(m["tokenizer"]["file"])))
        self.embeddings = bundle.array(m["embeddings"])
        self.text = m["text"]
        self.decoder = bundle.graph("decoder")
        self.mask_min = float(self.decoder["mask_min"])
        self.stop_ids = set(m["special_tokens"]["stop_token_ids"])
        self.image_token_id = int(m["special_tokens"]["image_token_id"])
        self.max_positions = int(self.text["max_positions"])
        self.fused = fused
        self.tree_spec = None  # override the manifest's TreeSpec (benchmarks, tuning)
        self.unrolled_draft: bool | None = None  # None: the one-call draft_tree graph when it fits the tree
        runtime_cfg = m.get("runtime") or {}
        self.speculative_default = self.has_drafter and bool(runtime_cfg.get("speculative", True))
        self.speculative_note = runtime_cfg.get("speculative_note") if self.has_drafter and not self.speculative_default else None
        if warm:
            self.warm()
        self.load_ms = (time.perf_counter() - t0) * 1000

    def graphs_in_use(self, speculative: bool | None = None) -> list[str]:
        """The graphs a call with these settings runs (images included)."""
        from .decoder import FusedOrtDecoder
        from .speculative import tree_graph_for
        from .tree import TreeSpec

        graphs = self.bundle.manifest["graphs"]
        fused = self.fused if self.fused is not None else (FusedOrtDecoder.GRAPH in graphs and self.backend.ort_cpu)
        names = ["vision", FusedOrtDecoder.GRAPH if fused else "decoder"]
        if self.speculative_default if speculative is None else speculative:
            tree = self.tree_spec or TreeSpec.from_json(self.bundle.manifest["tree"])
            tg = tree_graph_for(self.backend, self.bundle.manifest)
            g = graphs.get(tg or "", {})
            one_call = bool(g) and (g.get("depth"), g.get("top_k")) == (tree.depth, tree.top_k) and self.unrolled_draft is not False
            names.append(tg if one_call else self.bundle.manifest["drafter"]["graph"])
        return names

    def warm(self, speculative: bool | None = None) -> None:
        """Create the sessions of ``graphs_in_use`` now (idempotent)."""
        for graph in self.graphs_in_use(speculative):
            self.backend.open(graph)

    @classmethod
    def from_bundle(cls, path, backend: str = "auto", threads: int | None = None, verify: bool = True,
                    fused: bool | None = None, warm: bool = True) -> "Pipeline":
        """``fused=None`` picks the fused ORT-CPU decoder when the bundle has one and the backend is ORT on a CPU."""
        t0 = time.perf_counter()
        return cls(Bundle.load(Path(path), verify=verify), backend=backend, threads=threads, fused=fused, warm=warm, _t0=t0)

    # --- inputs -----------------------------------------------------------------------------------
    def prompt_text(self, num_images: int, prompt: str) -> str:
        return render(self.bundle.manifest["chat_template"], user_turn(num_images, prompt))

    def prepare(self, images, prompt: str, bgr: bool = False) -> Prepared:
        """``images``: a list (or one) of file paths, PIL images or numpy frames (H x W x 3 uint8, RGB; BGR with
        ``bgr=True``); empty or None for a text-only prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty; expected a question or instruction about the image(s)")
        pil_images = [as_image(im, i, bgr) for i, im in enumerate(_image_list(images))]
        processed = [self.pre.image(im) for im in pil_images]
        text = self.pre.expand_prompt(self.prompt_text(len(processed), prompt), processed)
        add_special = bool(self.bundle.manifest["preprocessing"].get("add_special_tokens", True))
        ids = np.array(self.tokenizer.encode(text, add_special_tokens=add_special).ids, dtype=np.int64)
        if len(ids) >= self.max_positions:
            raise InputError(
                f"the prompt is {len(ids)} tokens (images included); the model's context is {self.max_positions}: "
                f"shorten the prompt or use fewer/smaller images"
            )
        return Prepared(ids, [p.tiles for p in processed])

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[ids], dtype=np.float32)

    def prompt_embeds(self, prep: Prepared) -> np.ndarray:
        embeds = self.embed(prep.input_ids)  # [S,H]
        if prep.tiles:
            tiles = np.concatenate(prep.tiles, axis=0)
            image_embeds = self.backend.run("vision", {"pixel_values": tiles})["image_embeds"]
            flat = image_embeds.reshape(-1, image_embeds.shape[-1])
            slots = np.flatnonzero(prep.input_ids == self.image_token_id)
            if len(slots) != len(flat):
                raise InputError(f"{len(slots)} image tokens in the prompt but {len(flat)} image embeddings")
            embeds[slots] = flat
        return embeds[None]

    # --- the target graph -------------------------------------------------------------------------
    def new_decoder(self, slack: int = 0) -> DecoderRunner:
        """A decoder with a fresh cache for one sequence; ``slack`` extra rows hold a draft tree at the end."""
        return make_decoder(self.backend, self.bundle, self.max_positions + slack, self.fused)

    def step(self, dec: DecoderRunner, embeds: np.ndarray) -> dict:
        """Causal call over Q new positions, all kept."""
        q = embeds.shape[1]
        p = dec.length
        out = dec.run(embeds, causal_mask(q, p, self.mask_min), np.arange(p, p + q))
        dec.commit()
        return out

    # --- generation -------------------------------------------------------------------------------
    def generate(self, images, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
                 bgr: bool = False) -> GenerationResult:
        result = None
        for result in self.stream(images, prompt, max_new_tokens, temperature, top_p, seed, speculative, bgr):
            pass
        return result.final

    def stream(self, images, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, speculative: bool | None = None,
               bgr: bool = False) -> Iterator["StreamEvent"]:
        """Yield text pieces as they become printable; the last event carries the full result.

        ``images``: file paths, PIL images or numpy frames (H x W x 3 uint8 RGB; ``bgr=True`` for OpenCV / ROS
        ``bgr8`` frames), a list or a single one; empty or None answers text-only.
        ``speculative=None`` uses DREAM speculative decoding whenever the bundle has a drafter."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens {max_new_tokens}: expected at least 1")
        if speculative is None:
            speculative = self.speculative_default
        elif speculative and not self.has_drafter:
            raise InputError(f"{self.bundle.path}: this bundle has no drafter; export with --drafter to decode speculatively")
        cfg = SamplingConfig(temperature, top_p, seed)
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        prep = self.prepare(images, prompt, bgr)
        res = GenerationResult(prompt_tokens=len(prep.input_ids), speculative=bool(speculative))
        if speculative:
            res.accept_lengths = []
        tokens = (self._speculative_tokens(prep, cfg, rng, res) if speculative else self._plain_tokens(prep, cfg, rng))
        detok = _Detokenizer(self.tokenizer)
        t_first = None
        for token in tokens:
            res.token_ids.append(token)
            if t_first is None:
                t_first = time.perf_counter()
                res.ttft_ms = (t_first - t0) * 1000
            piece = detok.push(token)
            if token in self.stop_ids:
                res.stop_reason = "stop_token"
            elif len(res.token_ids) >= max_new_tokens:
                res.stop_reason = "max_new_tokens"
            elif res.prompt_tokens + len(res.token_ids) >= self.max_positions:  # the context is full
                res.stop_reason = "context_full"
            if res.stop_reason:
                res.decode_s = time.perf_counter() - t_first
                res.text = detok.text()
                tail = res.text[len(detok.emitted_text):]
                yield StreamEvent(piece + tail, res)
                return
            if piece:
                yield StreamEvent(piece, None)

    @property
    def has_drafter(self) -> bool:
        return bool(self.bundle.manifest.get("drafter"))

    def _plain_tokens(self, prep: Prepared, cfg: SamplingConfig, rng) -> Iterator[int]:
        dec = self.new_decoder()
        logits = self.step(dec, self.prompt_embeds(prep))["logits"][0, -1]
        while True:
            token = choose(logits, cfg, rng)
            yield token
            logits = self.step(dec, self.embed(np.array([token]))[None])["logits"][0, -1]

    def _speculative_tokens(self, prep: Prepared, cfg: SamplingConfig, rng, res: GenerationResult) -> Iterator[int]:
        from .speculative import SpeculativeDecoder
        from .tree import TreeSpec

        tree = self.tree_spec or TreeSpec.from_json(self.bundle.manifest["tree"])
        spec = SpeculativeDecoder(self, tree, cfg, rng, unrolled=self.unrolled_draft)
        yield spec.start(self.prompt_embeds(prep), prep.input_ids)
        while True:
            step = spec.step()
            res.accept_lengths.append(len(step.tokens))
            yield from step.tokens


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
    """Incremental decoding that never emits half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted_text = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted_text):
            return ""
        piece = text[len(self.emitted_text):]
        self.emitted_text = text
        return piece
