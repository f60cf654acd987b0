"""What a bundle needs on a GPU backend, decided from its manifest alone: pure Python, no TensorRT, no GPU, so all
of it is tested on the CPU. Both GPU paths use it: the TensorRT backend (``trt.py``) for everything below, ONNX
Runtime's TensorRT provider for the profiles (``ort.trt_profile_options``) and its device decoder for the buffers.

- **engines and optimization profiles**: one engine per graph, with the profiles every call of the runtime
  needs (vision: 1..max tiles, or one image of any size up to the longest edge; decoder: prefill, step and
  verify; drafter graphs: catch-up and tree levels). ``Plan.profile_for(graph, shapes)`` names the profile that
  serves a call, or says why none does;
- **where engines live**: ``engines/<gpu>-sm<cc>-trt<version>-<precision>/`` in the bundle, each engine with the
  sha256 of the graph it was built from. A changed graph, GPU, TensorRT version or precision gives another key
  or a failed check, so an engine is rebuilt, never silently reused (``EngineCache``);
- **device buffers**: the KV caches preallocated to ``max_positions`` + the tree, written in place, what each
  kind of call copies back to the host (only the rows acceptance needs) and the device copies that keep an
  accepted path's K/V rows (``kv_row_copies``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import DTYPE_BYTES


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) for each symbolic dimension of the graph's inputs."""

    name: str
    dims: dict

    def fits(self, values: dict) -> str | None:
        """None when every dimension is inside its range, else the first one that is not."""
        for dim, v in values.items():
            if dim not in self.dims:
                continue
            lo, _, hi = self.dims[dim]
            if not lo <= v <= hi:
                return f"{dim}={v} outside [{lo}, {hi}]"
        return None

    def violations(self) -> list[str]:
        """What makes this profile one TensorRT refuses: a range not ordered min <= opt <= max, or a point (min,
        opt or max) where a summed dimension is not the sum of its parts (``SUM_DIMS``). Empty when feasible."""
        out = []
        for dim, (lo, opt, hi) in self.dims.items():
            if not 0 <= lo <= opt <= hi:
                out.append(f"{dim}: min {lo}, opt {opt}, max {hi} are not ordered min <= opt <= max")
        for total, (a, b) in SUM_DIMS.items():
            if total not in self.dims:
                continue
            if a not in self.dims or b not in self.dims:
                out.append(f"{total} needs {a} and {b} in the same profile")
                continue
            for k, point in enumerate(("min", "opt", "max")):
                want = self.dims[a][k] + self.dims[b][k]
                if self.dims[total][k] != want:
                    out.append(f"{point}: {total}={self.dims[total][k]}, but the graph needs {a} + {b} = "
                               f"{self.dims[a][k]} + {self.dims[b][k]} = {want}")
        return out

    def point(self, k: int) -> dict:
        """The value of every dimension at min (0), opt (1) or max (2)."""
        return {d: v[k] for d, v in self.dims.items()}

    def input_shapes(self, inputs: list[dict]) -> dict:
        """name -> (min shape, opt shape, max shape), as ``IOptimizationProfile.set_shape`` takes them."""
        out = {}
        for t in inputs:
            shapes = []
            for k in range(3):
                shapes.append(tuple(d if isinstance(d, int) else self.dims[d][k] for d in t["shape"]))
            out[t["name"]] = tuple(shapes)
        return out


# The graphs' own shape constraints between symbolic dimensions: each mask is [1, 1, q, past + q], so its width is
# the sum of a cache length and a call length (decoder: attention_mask; drafter graphs: attention_mask and
# cross_mask). An optimization profile is feasible only when min, opt and max each satisfy every one of them.
SUM_DIMS = {"total_len": ("past_len", "q_len"), "mem_total_len": ("mem_len", "m_len")}


def _profile(name: str, dims: dict) -> "Profile":
    """A profile whose summed dimensions (``SUM_DIMS``) are derived point by point from their parts."""
    dims = {k: tuple(int(x) for x in v) for k, v in dims.items()}
    for total, (a, b) in SUM_DIMS.items():
        if a in dims and b in dims:
            dims[total] = tuple(x + y for x, y in zip(dims[a], dims[b]))
    return Profile(name, dims)


def _symbolic_values(inputs: list[dict], shapes: dict) -> dict:
    """The value each symbolic dimension takes in a call (inconsistent values are an error)."""
    values: dict = {}
    for t in inputs:
        shape = shapes[t["name"]]
        if len(shape) != len(t["shape"]):
            raise ValueError(f"input {t['name']}: rank {len(shape)}, the graph declares {t['shape']}")
        for d, v in zip(t["shape"], shape):
            if isinstance(d, int):
                if d != v:
                    raise ValueError(f"input {t['name']}: shape {tuple(shape)}, the graph declares {t['shape']}")
            elif values.setdefault(d, v) != v:
                raise ValueError(f"dimension {d!r} is {values[d]} in one input and {v} in {t['name']}")
    return values


def max_tiles(manifest: dict) -> int:
    """The most tiles one vision call can get: images until the context is full, each at most a grid + global."""
    pre = manifest["preprocessing"]
    per_image = int(pre.get("tiles_per_image") or 1)  # a family with one square per image says so
    if pre.get("do_image_splitting"):
        tile = int(pre["max_image_size"])
        n = math.ceil(int(pre["size_longest_edge"]) / tile)
        per_image = n * n + 1
    seq = int(pre.get("image_seq_len", 1))
    by_context = max(1, (int(manifest["text"]["max_positions"]) - 1) // max(seq, 1))
    return max(per_image, min(by_context, 4 * per_image))  # up to 4 images of the bundle's largest grid


@dataclass
class Plan:
    manifest: dict
    profiles: dict = field(default_factory=dict)   # graph -> [Profile]

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Plan":
        plan = cls(manifest)
        text = manifest["text"]
        P = int(text["max_positions"])
        tree = manifest.get("tree") or {"total_tokens": 1}
        N = int(tree["total_tokens"])
        cap = P + N  # the KV buffer holds the context and one verified tree past it
        graphs = manifest["graphs"]
        if "vision" in graphs:
            t = max_tiles(manifest)
            pre = manifest["preprocessing"]
            grid = math.ceil(int(pre["size_longest_edge"]) / int(pre["max_image_size"])) if pre.get("do_image_splitting") else 0
            if pre.get("vision_profile"):  # one image at its own size per call (Pixtral, Qwen2.5-VL): the family's ranges
                plan.profiles["vision"] = [Profile("image", {k: tuple(int(x) for x in v)
                                                             for k, v in pre["vision_profile"].items()})]
            else:
                plan.profiles["vision"] = [Profile("tiles", {"tiles": (1, max(1, min(t, grid * grid + 1)), t)})]
        if "decoder" in graphs:
            # most specific first: a call takes the first profile it fits (``profile_for``). Each point (min, opt,
            # max) is a shape set the graph accepts: the mask is [1, 1, q, past + q] (``derive_sums``).
            half = P // 2
            plan.profiles["decoder"] = [
                _profile("step", {"q_len": (1, 1, 1), "past_len": (0, half, P - 1)}),
                # a tree of N (fewer where the context ends) after up to P-1 positions
                _profile("verify", {"q_len": (1, N, N), "past_len": (0, half, P - 1)}),
                # a prompt (or a session's new turn) after at most half the context: up to P - 1 new positions
                _profile("prefill", {"q_len": (1, min(256, P - 1), P - 1), "past_len": (0, 0, half)}),
                # a later turn: after more than half the context, fewer than half of it is left for new positions
                _profile("extend", {"q_len": (1, min(64, P - half), P - half), "past_len": (0, half, P - 1)}),
            ]
        info = manifest.get("drafter") or {}
        for name in sorted({info.get("graph"), info.get("tree_graph")} - {None}):
            if name not in graphs:
                continue
            q_hi = P  # a catch-up covers at most the whole prompt plus the first token
            scratch = N + int(tree.get("depth", 1)) * int(tree.get("top_k", 1))  # a step's drafted rows, rolled back
            self_hi = cap + scratch
            q_opt = max(1, min(N, q_hi))
            plan.profiles[name] = [_profile("all", {
                "q_len": (1, q_opt, q_hi), "m_len": (1, q_opt, q_hi),
                "past_len": (0, P // 2, self_hi), "mem_len": (0, P // 2, self_hi)})]
        for name, profs in plan.profiles.items():
            for prof in profs:
                bad = prof.violations()
                if bad:  # a planning error, never the user's: TensorRT would refuse the profile and build nothing
                    raise ValueError(f"graph {name!r} profile {prof.name!r}: {'; '.join(bad)}")
        return plan

    def graph_inputs(self, graph: str) -> list[dict]:
        return self.manifest["graphs"][graph]["inputs"]

    def profile_for(self, graph: str, shapes: dict) -> Profile:
        """The first profile of ``graph``'s engine that serves a call with these input shapes."""
        if graph not in self.profiles:
            raise KeyError(f"graph {graph!r} has no engine in the plan (it has: {sorted(self.profiles)})")
        values = _symbolic_values(self.graph_inputs(graph), shapes)
        misses = []
        for prof in self.profiles[graph]:
            why = prof.fits(values)
            if why is None:
                return prof
            misses.append(f"{prof.name}: {why}")
        raise ValueError(f"graph {graph!r}: no profile serves {values} ({'; '.join(misses)})")

    # --- device buffers -----------------------------------------------------------------------------
    def kv_buffers(self, dtype: str = "float32") -> dict:
        """The target's KV caches on the device: one [1, capacity, kv_heads, head_dim] buffer per layer for keys
        and one for values (the decoder's "bshd" layout: the first L positions are one contiguous block, bound as
        the past), capacity = max_positions + the tree; byte offsets into one allocation."""
        text = self.manifest["text"]
        cap = int(text["max_positions"]) + int((self.manifest.get("tree") or {"total_tokens": 1})["total_tokens"])
        shape = (1, cap, int(text["kv_heads"]), int(text["head_dim"]))
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        align = 256  # cudaMalloc alignment
        step = (nbytes + align - 1) // align * align
        buffers, offset = {}, 0
        for i in range(int(text["num_layers"])):
            for kind in ("key", "value"):
                buffers[f"{kind}_{i}"] = {"shape": shape, "dtype": dtype, "offset": offset, "bytes": nbytes}
                offset += step
        return {"buffers": buffers, "total_bytes": offset, "capacity": cap,
                "row_bytes": int(text["kv_heads"]) * int(text["head_dim"]) * DTYPE_BYTES[dtype]}

    def logits_rows(self, q_len: int) -> int:
        """Logits rows a decoder call copies back: every row of a call no longer than the tree (a verify walks
        them all; a short prefill costs little), else only the last row (a prompt prefill samples one token)."""
        n = int((self.manifest.get("tree") or {"total_tokens": 1})["total_tokens"])
        return q_len if q_len <= max(n, 1) else 1

    def copy_back(self, call: str, q_len: int, accepted: int = 0) -> dict:
        """Bytes each kind of call copies to the host: logits and hidden rows that acceptance needs, never K/V.
        prefill/step: the last row's logits and the rows' hidden states (the drafter's memory);
        verify: every row's logits (the acceptance walk) and the hidden rows of the accepted path only."""
        text = self.manifest["text"]
        v, h = int(text["vocab_size"]), int(text["hidden_size"])
        if call in ("prefill", "step"):
            rows_logits, rows_hidden = self.logits_rows(q_len), q_len
        elif call == "verify":
            rows_logits, rows_hidden = q_len, accepted + 1
        else:
            raise ValueError(f"call {call!r}: expected prefill, step or verify")
        return {"logits_bytes": rows_logits * v * 4, "hidden_bytes": rows_hidden * h * 4, "kv_bytes": 0}


def kv_row_copies(length: int, q_len: int, rows=None) -> list[tuple[int, int, int]]:
    """Device-to-device copies that keep a call's new K/V rows: (destination row in the cache, source row in the
    call's scratch output, row count). All Q rows land at ``length``..; an accepted draft path (``rows``, in
    order) is compacted there, consecutive source rows merged into one copy."""
    if rows is None:
        return [(length, 0, q_len)] if q_len else []
    out: list[list[int]] = []
    for i, r in enumerate(int(x) for x in rows):
        if not 0 <= r < q_len:
            raise ValueError(f"row {r} outside the call's {q_len} new rows")
        if out and out[-1][1] + out[-1][2] == r:
            out[-1][2] += 1
        else:
            out.append([length + i, r, 1])
    return [tuple(c) for c in out]


# --- engine cache --------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def engine_dir(bundle: Path, gpu_name: str, compute_capability: tuple[int, int], trt_version: str, precision: str) -> Path:
    """``engines/<gpu>-sm<cc>-trt<version>-<precision>/``: engines are not portable across any of these."""
    major, minor = compute_capability
    return Path(bundle) / "engines" / f"{_slug(gpu_name)}-sm{major}{minor}-trt{trt_version}-{precision}"


def graph_digest(manifest: dict, graph: str) -> str:
    """What an engine of ``graph`` depends on, as one sha256: the graph file's and each of its external-data files'
    sha256 (from the verified manifest), so new weights behind an unchanged graph also mean a rebuild."""
    entry = manifest["graphs"][graph]
    files = manifest.get("files") or {}
    parts = [f"{name}={files.get(name, '?')}" for name in [entry["file"], *sorted(entry.get("external_data", []))]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# Bumped whenever what ``trt.build_engine`` puts into an engine changes (its network flags, builder flags, the
# way profiles are set): engines built by an older recipe are then rebuilt, not reused.
BUILD_FORMAT = 2


def profile_shapes(plan: "Plan", graph: str) -> list[dict]:
    """Every optimization profile of ``graph``, in engine order, as ``{input: {"min": [...], "opt": [...],
    "max": [...]}}`` (what ``IOptimizationProfile.set_shape`` gets; ``dream-build-engines --print-profiles``)."""
    out = []
    for prof in plan.profiles[graph]:
        shapes = prof.input_shapes(plan.graph_inputs(graph))
        out.append({name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in shapes.items()})
    return out


def engine_key(manifest: dict, plan: "Plan", graph: str, builder_flags: dict) -> str:
    """What an engine of ``graph`` depends on beyond its folder's GPU / TensorRT / precision, as one sha256: the
    graph and its weights (``graph_digest``), every profile's shapes, the builder flags and ``BUILD_FORMAT``.
    Any of them changed means another key, so a stale engine is rebuilt, never reused."""
    record = {"graph": graph_digest(manifest, graph), "profiles": profile_shapes(plan, graph),
              "flags": {str(k): str(v) for k, v in sorted(builder_flags.items())}, "format": BUILD_FORMAT}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class EngineCache:
    """Engines of one (GPU, TensorRT, precision) folder; each ``<graph>.plan`` has a ``<graph>.json`` recording the
    key it was built for (``engine_key``: graph, weights, profiles, builder flags, build format). ``lookup``
    returns the engine only when that key still matches."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def lookup(self, graph: str, key: str) -> Path | None:
        plan, meta = self.folder / f"{graph}.plan", self.folder / f"{graph}.json"
        if not plan.is_file() or not meta.is_file():
            return None
        try:
            recorded = json.loads(meta.read_text()).get("key")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return plan if recorded == key else None

    def store(self, graph: str, key: str, engine_bytes: bytes, extra: dict | None = None) -> Path:
        """Write the engine and its record, each to a temp file first, then renamed: never half-written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        plan, meta = self.folder / f"{graph}.plan", self.folder / f"{graph}.json"
        for path, data in ((plan, engine_bytes), (meta, json.dumps({**(extra or {}), "key": key}).encode())):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return plan
