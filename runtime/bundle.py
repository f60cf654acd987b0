"""Bundle = one self-describing folder. This module owns the manifest schema and its verification."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError

FORMAT = "dream-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# bytes per element of each dtype name a manifest uses
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "bool": 1}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path, verify: bool = True) -> "Bundle":
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"{path}: bundle folder does not exist")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing; expected a bundle written by dream-export")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath}: not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: field 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r}; expected {FORMAT!r}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: format_version {version!r} is not supported by this runtime (expected {FORMAT_VERSION}); "
                f"re-export the bundle with a matching dream-export"
            )
        bundle = cls(path, manifest)
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{self.path / MANIFEST}: field 'files' is missing or empty")
        for name, digest in files.items():
            fpath = self._inside(name)
            if not fpath.is_file():
                raise BundleError(f"{fpath}: listed in the manifest but missing from the bundle")
            actual = sha256_file(fpath)
            if actual != digest:
                raise BundleError(
                    f"{fpath}: sha256 {actual[:16]}… does not match the manifest's {digest[:16]}… (file altered or truncated)"
                )

    def file(self, name: str) -> Path:
        """A file of the bundle: listed (and so sha256-verified) in the manifest's ``files`` and inside the folder.
        Anything else (an absolute path, ``..``, a link out of the folder, an unlisted name) is refused."""
        files = self.manifest.get("files") or {}
        if not isinstance(name, str) or name not in files:
            raise BundleError(f"{self.path / MANIFEST}: refers to {name!r}, which is not in its 'files' list "
                              f"(every file the runtime opens must be listed there with its sha256)")
        return self._inside(name)

    def _inside(self, name) -> Path:
        """``name`` as a path inside the bundle folder, links resolved; anything that leaves it is refused."""
        if not isinstance(name, str) or not name:
            raise BundleError(f"{self.path / MANIFEST}: file name {name!r}; expected a file name inside the bundle")
        path = self.path / name
        root = self.path.resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or root not in path.resolve().parents:
            raise BundleError(f"{self.path / MANIFEST}: file {name!r} lies outside the bundle folder {self.path} "
                              f"(absolute, '..' or a link out of it); expected a file inside the folder")
        return path

    def array(self, entry: dict):
        """A read-only array the manifest describes: ``{"file", "offset", "shape", "dtype"}`` (a slice of a weight
        file, memory-mapped) or ``{"file"}`` of a .npy file (loaded without pickle)."""
        path = self.file(entry["file"])
        if "offset" not in entry:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        dtype, shape, offset = np.dtype(entry["dtype"]), tuple(int(d) for d in entry["shape"]), int(entry["offset"])
        need = offset + dtype.itemsize * int(np.prod(shape))
        if offset < 0 or path.stat().st_size < need:
            raise BundleError(f"{path}: {entry.get('dtype')} {list(shape)} at offset {offset} needs {need} bytes; "
                              f"the file has {path.stat().st_size}")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def graph(self, name: str) -> dict:
        graphs = self.manifest.get("graphs", {})
        if name not in graphs:
            raise BundleError(f"{self.path / MANIFEST}: no graph {name!r}; has {sorted(graphs)}")
        return graphs[name]


def find_latest_bundle(store: Path) -> Path | None:
    """The most recently written bundle under ``store/bundles`` (by manifest mtime)."""
    root = store / "bundles"
    if not root.is_dir():
        return None
    candidates = [p for p in root.iterdir() if (p / MANIFEST).is_file() and not p.name.startswith(".")]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p / MANIFEST).stat().st_mtime)
