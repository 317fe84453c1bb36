"""Content hashes. Every cache and dataset digest in fcdpo is a sha256 over canonical JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import fcdpo


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default)


def _default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"cannot hash object of type {type(obj).__name__}")


def digest(obj: Any, length: int = 16) -> str:
    """Short hex sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The fcdpo version plus a hash of the library's own source, so cache keys change with the code."""
    root = Path(fcdpo.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return f"{fcdpo.__version__}+{h.hexdigest()[:12]}"


FILE_KEYS = {"path", "file", "data_files"}


def identity(obj: Any) -> Any:
    """A JSON-able content identity for cache keys: problem sets by digest, files by sha256, folders by
    their files, stage results by the files they stand for, pydantic models by their fields, models by
    name + weights hash (a :class:`~fcdpo.policy.Policy` says what keys it: ``cache_identity``)."""
    if hasattr(obj, "digest") and hasattr(obj, "problems"):  # ProblemSet
        return {"problems": obj.digest}
    if callable(getattr(obj, "files", None)):  # a stage result: the content of the files it stands for
        return {"files": [identity(Path(p)) for p in obj.files()]}
    if callable(getattr(obj, "cache_identity", None)):  # a Policy: its model by weights, not by path
        return identity(obj.cache_identity())
    if hasattr(obj, "weights_hash"):  # ResolvedModel
        return {"model": obj.name, "weights": obj.weights_hash}
    if isinstance(obj, Path):
        if obj.is_file():
            return {"file": file_sha256(obj)}
        if obj.is_dir():
            return {
                "dir": {
                    str(p.relative_to(obj)): file_sha256(p) for p in sorted(obj.rglob("*")) if p.is_file()
                }
            }
        return {"missing": str(obj)}
    if hasattr(obj, "model_dump"):
        return identity(obj.model_dump(mode="json"))
    if isinstance(obj, list | tuple):
        return [identity(x) for x in obj]
    if isinstance(obj, dict):
        # a file named in a config (e.g. a JSONL problem set's ``path``) counts by content, not by name
        return {
            str(k): {"path": v, **identity(Path(v))}
            if k in FILE_KEYS and isinstance(v, str) and Path(v).is_file()
            else identity(v)
            for k, v in obj.items()
        }
    return obj
