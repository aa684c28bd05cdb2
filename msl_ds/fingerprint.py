"""What a run's results depend on, kept next to them: ``<run.output_dir>/fingerprint.json``.

A fingerprint holds the method, every config key that changes what is trained or measured, the
checksums of the data files (``data.dir``), of the model files (``model.path``) and of the
DeepSpeed JSON, and the global batch (groups per optimizer step, ``config.batch_shape``: how it is
split into forwards and ranks does not change training, so a resume on another rank count with
the same global batch matches). A resume whose fingerprint differs is refused, naming the keys, unless
``run.resume=force``; ``run.resume=false`` on a directory that already holds a run is refused.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from msl_ds.config import RunConfig, batch_shape, resolve_path
from msl_ds.io import read_json, sha256

FILE = "fingerprint.json"
# keys that do not change what a run computes (or that a checksum below stands in for)
EXCLUDED = (
    "run.name",
    "run.output_dir",
    "run.resume",
    "run.shared_fs",
    "data.dir",  # its files' checksums count
    "model.path",  # its files' checksums count
    "deepspeed.config",  # the file's checksum counts
    "deepspeed.backend",
    "deepspeed.timeout_s",
    "deepspeed.threads_per_rank",
    "train.micro_batch_size",  # train.global_batch_size (the resolved one) counts
    "train.grad_accum",
    "train.save_every_steps",
    "train.log_every_steps",
    "monitor.*",
    "base.*",  # launch/make_base.py's settings; the base model's checksums count
)
# what shows that a directory already holds a run
RUN_FILES = ("config.yaml", FILE, "summary.json")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _files(root: str | Path, label: str) -> dict[str, str]:
    root = Path(root)
    if not root.is_dir():
        return {f"{label}:": "missing"}
    return {f"{label}:{q.relative_to(root)}": sha256(q) for q in sorted(root.rglob("*")) if q.is_file()}


def fingerprint(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The flat ``{key: value}`` fingerprint of ``cfg`` launched on ``world_size`` ranks."""
    keys = {k: v for k, v in _flatten(cfg.to_dict()).items() if not any(fnmatch.fnmatch(k, pat) for pat in EXCLUDED)}
    keys["train.global_batch_size"] = batch_shape(cfg.train, world_size).groups
    ds = resolve_path(cfg.deepspeed.config, cfg.source)
    keys["deepspeed.config:sha256"] = sha256(ds) if ds.is_file() else "missing"
    keys.update(_files(cfg.data.dir, "data.dir"))
    keys.update(_files(cfg.model.path, "model.path"))
    return keys


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ (or that only one side has), sorted."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))


def holds_run(out: str | Path) -> bool:
    out = Path(out)
    return out.is_dir() and (any((out / n).exists() for n in RUN_FILES) or any(out.glob("stage_*")))


def _name(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_output_dir(out: str | Path, fp: dict[str, Any], resume: bool | str) -> dict[str, Any]:
    """What a launch may do with ``out`` (decided on rank 0).

    Returns ``{"error": str | None, "warning": str | None, "fresh": bool, "differs": [keys]}``.
    """
    out = Path(out)
    result: dict[str, Any] = {"error": None, "warning": None, "fresh": False, "differs": []}
    if not holds_run(out):
        result["fresh"] = True
        return result
    if resume is False:
        result["error"] = (
            f"run.output_dir={out} already holds a run and run.resume=false: choose a new run.output_dir or "
            f"delete this one for a fresh run (run.resume=true continues it)"
        )
        return result
    path = out / FILE
    if not path.is_file():
        what = f"{out} holds a run without {FILE} (an older msl_ds, or another tool's directory)"
        if resume == "force":
            result["warning"] = f"run.resume=force: {what}; adopting it with this config's fingerprint"
        else:
            result["error"] = (
                f"run.output_dir: {what}, so nothing shows it was made with this config; use a new "
                f"run.output_dir, or run.resume=force to continue it anyway"
            )
        return result
    differs = differences(read_json(path).get("keys", {}), fp)
    result["differs"] = differs
    if differs and resume == "force":
        result["warning"] = (
            f"run.resume=force: {out} was made with other settings ({_name(differs)}); continuing it: finished "
            f"stages are kept as they are and later stages use this config"
        )
    elif differs:
        result["error"] = (
            f"run.output_dir={out} was made with other settings: {_name(differs)} differ from this launch's; "
            f"use a new run.output_dir, restore those settings, or set run.resume=force to continue it anyway"
        )
    return result


def record(out: str | Path, fp: dict[str, Any], decision: dict[str, Any], config_name: str) -> dict[str, Any]:
    """The fingerprint file's new content: this launch's keys, and the history of forced changes."""
    path = Path(out) / FILE
    history = read_json(path).get("forced", []) if path.is_file() else []
    if decision["differs"] or decision["warning"]:
        history.append({"differs": decision["differs"], "config": config_name})
    return {"keys": fp, "forced": history}
