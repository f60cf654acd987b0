"""Bundle = one self-describing folder. This module owns the manifest schema and its verification."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError

FORMAT = "dream-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
            fpath = self.path / name
            if not fpath.is_file():
                raise BundleError(f"{fpath}: listed in the manifest but missing from the bundle")
            actual = sha256_file(fpath)
            if actual != digest:
                raise BundleError(
                    f"{fpath}: sha256 {actual[:16]}… does not match the manifest's {digest[:16]}… (file altered or truncated)"
                )

    def file(self, name: str) -> Path:
        return self.path / name

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
