"""What the exporter needs to know about a VLM family, and the registry of families.

An adapter answers: how to turn pixels into image embeddings, where the token embeddings, decoder
layers, final norm, rotary embedding and LM head are, which token id marks image positions, and how
the family preprocesses images and prompts (written to the manifest for the torch-free runtime).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

_ADAPTERS: list[type["TargetAdapter"]] = []

# The export check's prompt and continuation (real text, so the decoder sees what a trained model sees)
VALIDATION_PROMPT = "Describe what the robot sees on the kitchen table, in two sentences."
VALIDATION_CONTINUATION = (" The table holds a red cup, a white plate with two slices of bread and a small knife."
                           " Behind them, a window lets in the morning light.")


def pixel_rules(ip) -> dict[str, Any]:
    """The rescale/normalise/resample fields every runtime preprocessing kind reads, from an HF image processor."""
    return {
        "do_convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
        "do_resize": bool(ip.do_resize),
        "resample": int(ip.resample),
        "do_rescale": bool(ip.do_rescale),
        "rescale_factor": float(ip.rescale_factor),
        "do_normalize": bool(ip.do_normalize),
        "image_mean": [float(v) for v in ip.image_mean],
        "image_std": [float(v) for v in ip.image_std],
    }


def stacked_features(out):
    """[n_image_tokens, H] from what a transformers ``get_image_features`` returns (an output whose
    ``pooler_output`` is a tensor or one tensor per image, or those directly)."""
    import torch

    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def register_adapter(cls):
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model, processor) -> "TargetAdapter":
    model_type = getattr(model.config, "model_type", None)
    for cls in _ADAPTERS:
        if model_type in cls.model_types and cls.accepts(model.config):
            return cls(model, processor)
    known = sorted(t for cls in _ADAPTERS for t in cls.model_types)
    from ..errors import DreamExportError

    raise DreamExportError(f"model_type {model_type!r} has no target adapter; supported: {', '.join(known)}")


class TargetAdapter(ABC):
    model_types: tuple[str, ...] = ()
    family: str = ""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def accepts(cls, config) -> bool:
        """Whether this adapter takes a model of one of its ``model_types`` (families that share a model type, e.g.
        LLaVA with a CLIP tower and LLaVA with a Pixtral tower, tell themselves apart here)."""
        return True

    # --- pieces of the text model (transformers' VLM conventions; a family overrides what differs) ---------
    @property
    @abstractmethod
    def text_model(self):
        """The family's text decoder module (embed_tokens, layers, norm, rotary_emb)."""

    @property
    def text_config(self):
        return self.model.config.text_config

    def embed_tokens(self):
        return self.text_model.embed_tokens

    def decoder_layers(self) -> list:
        return list(self.text_model.layers)

    def final_norm(self):
        return self.text_model.norm

    def rotary_emb(self):
        return self.text_model.rotary_emb

    def lm_head(self):
        return self.model.lm_head

    # --- attention and logits rules (defaults: a Llama-style decoder) ---------------------------
    def attention_windows(self) -> list[int | None]:
        """Per decoder layer: its sliding window (a query at position q sees keys at positions > q - window) or
        None for global attention; from ``layer_types`` / ``sliding_window`` as transformers' masks read them."""
        cfg, n = self.text_config, len(self.decoder_layers())
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types:
            return [int(window) if t == "sliding_attention" and window else None for t in types[:n]]
        if window and getattr(cfg, "use_sliding_window", True):
            return [int(window)] * n
        return [None] * n

    def layer_position_embeddings(self, hidden, position_ids) -> list:
        """Per decoder layer: the (cos, sin) its attention takes (one rotary embedding for all by default)."""
        pe = self.rotary_emb()(hidden, position_ids)
        return [pe] * len(self.decoder_layers())

    def final_logits(self, logits):
        """What the family does to the LM head's output (e.g. Gemma's tanh soft-cap); nothing by default."""
        return logits

    def embed_scale(self) -> float:
        """The factor the family's embedding layer multiplies token rows by (Gemma: sqrt(hidden)); the bundle
        stores the raw matrix (shared with a tied head) and the runtime and draft graphs apply the factor."""
        emb = self.embed_tokens()
        scale = getattr(emb, "embed_scale", None)
        if scale is None:
            return 1.0
        return float(scale.to(emb.weight.dtype)) if hasattr(scale, "to") else float(scale)

    def image_attention(self) -> str:
        """``causal`` (default) or ``bidirectional``: image tokens of one image see each other in the prompt."""
        return "causal"

    def fused_cpu_graph(self) -> bool:
        """Whether ``export/fused.py``'s GroupQueryAttention graph can run this family's layers (``fused_layer``);
        the export checks it against the standard graph either way."""
        return True

    def fused_layer(self, layer, hidden, position_embeddings, attend):
        """One decoder layer for the fused ORT-CPU graph: the layer's own submodules in transformers' order, with
        ``attend(q, k, v, scale)`` (q/k rotated, [1,heads,s,hd]; v [1,s,kv_heads*hd]) in place of its attention
        kernel. Llama-style layers (pre-norm attention and MLP) by default."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        s, hd = h.shape[1], attn.head_dim
        q = attn.q_proj(h).view(1, s, -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(1, s, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        hidden = hidden + attn.o_proj(attend(q, k, attn.v_proj(h), attn.scaling))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def stop_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.text_config.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return [int(i) for i in ids if i is not None]

    # --- vision ------------------------------------------------------------------------------
    @abstractmethod
    def vision_module(self):
        """nn.Module: pixel_values [tiles,3,S,S] -> image_embeds [tiles, image_seq_len, hidden]."""

    def vision_input_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config.vision_config
        return (cfg.num_channels, cfg.image_size, cfg.image_size)

    def vision_graph(self, hidden: int, seed: int = 0):
        """(GraphSpec, [(case, feeds)]): the vision graph's I/O and the inputs the export checks it on (and traces
        it with). Fixed-size tiles, or one image per call at ``vision_sizes``; a family whose tower needs more
        inputs than pixels (Qwen2.5-VL's window order) overrides this."""
        from ..export.specs import vision_spec
        from ..export.validate import vision_examples

        sizes = self.vision_sizes()
        spec = vision_spec(*self.vision_input_shape()[:2], int(self.preprocessing()["image_seq_len"]), hidden,
                           dynamic_size=sizes is not None)
        return spec, vision_examples(spec, sizes, seed)

    def rope_axes(self) -> int:
        """1: position_ids [1, Q]; 3: multimodal rotary (M-RoPE) position ids [3, 1, Q] (time, height, width),
        which the runtime computes from the prompt's image grids (``runtime/rope.py``)."""
        return 1

    def vision_sizes(self) -> list[tuple[int, int]] | None:
        """None: the vision graph takes a batch of fixed-size tiles (``vision_input_shape``). A family whose tower
        takes one image of its own size per call (Pixtral) returns example (height, width) sizes instead: the graph's
        height, width and token count are dynamic, it is exported at the first size and checked at each, and the
        manifest's ``preprocessing.vision_call`` is ``per_image``."""
        return None

    def check_vision_module(self, cases) -> None:
        """A vision module written from a family's pieces (not its own forward) == transformers'
        ``get_image_features``: ``cases`` are (label, module inputs, ``hf_image_features`` kwargs)."""
        from ..errors import DreamExportError
        import torch

        module = self.vision_module().eval()
        for label, inputs, hf_kwargs in cases:
            with torch.no_grad():
                ours = module(*(torch.from_numpy(x) for x in inputs))[0]
                theirs = self.hf_image_features(**hf_kwargs)
            err = float((ours - theirs).abs().max())
            if not err <= 1e-4 * max(1.0, float(theirs.abs().max())):
                raise DreamExportError(f"the vision graph's module differs from transformers' get_image_features by "
                                       f"{err:.2e} on a {label} image")

    @abstractmethod
    def hf_image_features(self, pixel_values, **processor_outputs):
        """[n_image_tokens, H]: what transformers' own forward puts at the image tokens, from the HF processor's
        outputs (training features use it; the exported ``vision_module`` is checked against the same model)."""

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # --- preprocessing, written to the manifest -----------------------------------------------
    @abstractmethod
    def preprocessing(self) -> dict[str, Any]: ...


    def chat_template(self) -> str:
        template = getattr(self.processor, "chat_template", None) or getattr(self.processor.tokenizer, "chat_template", None)
        if not template:
            from ..errors import DreamExportError

            raise DreamExportError("the processor has no chat_template; expected one for instruction-tuned models")
        return template

    def chat_template_vars(self) -> dict:
        """The special tokens transformers passes to chat templates (``bos_token``, ``eos_token``, ...)."""
        tok = self.processor.tokenizer
        return {k: v for k, v in (getattr(tok, "special_tokens_map", None) or {}).items() if isinstance(v, str)}

    def validation_sample(self):
        """Real token ids for the decoder's export check: a chat-templated prompt and a continuation."""
        import numpy as np

        from runtime.chat import render, user_turn

        from ..export.validate import TextSample

        tok = self.processor.tokenizer
        add_special = bool(self.preprocessing().get("add_special_tokens", True))
        text = render(self.chat_template(), user_turn(0, VALIDATION_PROMPT), variables=self.chat_template_vars())
        prompt = tok(text, add_special_tokens=add_special)["input_ids"]
        cont = tok(VALIDATION_CONTINUATION, add_special_tokens=False)["input_ids"]
        return TextSample(np.asarray(prompt, np.int64), np.asarray(cont, np.int64))

    def extra_arrays(self) -> dict:
        """Arrays the runtime's preprocessing of this family needs (written to the bundle, listed under the
        manifest's ``arrays``); none by default."""
        return {}

    def tokenizer_json(self) -> str:
        """The fast tokenizer serialised as tokenizer.json text (what ``tokenizers`` loads)."""
        return self.processor.tokenizer.backend_tokenizer.to_str()
