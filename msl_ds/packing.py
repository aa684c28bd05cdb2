"""Padding-free packing of a forward's rows (``train.packing``).

Instead of right-padding every row to the longest, the rows of a forward are concatenated into
one sequence ``[1, sum of lengths]`` with ``position_ids`` restarting at 0 for every row and no
attention mask. That is only correct where attention cannot cross from one row into another:

* ``flash_attention_2``: transformers turns restarting ``position_ids`` into the varlen kernel's
  sequence boundaries (``modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids``).
* ``sdpa`` / ``eager``: transformers' ``masking_utils`` (``find_packed_sequence_indices``, called
  by ``create_causal_mask`` when the 2-D attention mask is ``None`` and there is no cache) builds
  a block-diagonal causal mask from the restarting positions, for model families whose modeling
  code builds its mask with ``create_causal_mask`` / ``create_sliding_window_causal_mask``.

:func:`packing_unsupported` checks both against the installed transformers (the family's modeling
source, read without importing it) and says why not; ``train.packing: true`` is refused at
config-check time and again when the trainer meets the loaded model. Log-probs are computed per
position and summed back per row (:func:`segment_sum`), so every loss term sees the same
``[rows]`` log-probs as without packing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

MASK_BUILDERS = ("create_causal_mask(", "create_sliding_window_causal_mask(")


def _transformers_detects_packing() -> str | None:
    try:
        import transformers
        from transformers import masking_utils
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        return f"transformers cannot be imported ({exc})"
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return (
            f"the installed transformers {transformers.__version__} does not detect packed position_ids "
            f"(no masking_utils.find_packed_sequence_indices)"
        )
    return None


def _modeling_source(model_type: str) -> str | None:
    """The text of transformers' ``modeling_<type>.py`` for ``model_type`` (None if there is none)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    name = module.rsplit(".", 1)[-1]
    try:
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{name}")
    except ModuleNotFoundError:  # no such family package
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).read_text(encoding="utf-8")


def unsupported_for_source(model_type: str, source: str | None, attn_implementation: str) -> str | None:
    """Why rows packed by position_ids could attend to each other in this family (None: they cannot)."""
    if attn_implementation == "flash_attention_2":
        return None  # varlen boundaries from position_ids, whatever the family's mask code
    why = _transformers_detects_packing()
    if why:
        return why
    if source is None:
        return f"transformers has no modeling code for model_type {model_type!r}"
    if not any(b in source for b in MASK_BUILDERS):
        return (
            f"model_type {model_type!r} builds its attention mask without transformers' masking_utils "
            f"(create_causal_mask), so with model.attn_implementation={attn_implementation} packed rows would "
            f"attend to each other; use model.attn_implementation=flash_attention_2"
        )
    return None


def packing_unsupported(model_path: str, attn_implementation: str, trust_remote_code: bool = False) -> str | None:
    """Config check: why ``train.packing`` cannot be used with this model dir and attention (None: it can).

    A model dir without a readable ``config.json`` is not judged here (the model check reports it);
    the trainer checks the loaded model again (:func:`packing_unsupported_model`).
    """
    try:
        mc: dict[str, Any] = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = str(mc.get("model_type", ""))
    if trust_remote_code and mc.get("auto_map"):
        return (
            f"{model_path} runs its own modeling code (trust_remote_code, auto_map), which msl_ds cannot check "
            f"for packed rows attending to each other"
        )
    return unsupported_for_source(model_type, _modeling_source(model_type) if model_type else None, attn_implementation)


def packing_unsupported_model(model: torch.nn.Module) -> str | None:
    """The same check against a loaded model: the source of the module its class comes from."""
    import sys

    cfg = getattr(model, "config", None)
    attn = str(getattr(cfg, "_attn_implementation", None) or "eager")
    if not type(model).__module__.startswith("transformers."):
        return (
            f"{type(model).__module__} is not transformers' own modeling code; msl_ds cannot check it for packed rows"
        )
    origin = getattr(sys.modules.get(type(model).__module__), "__file__", None)
    source = Path(origin).read_text(encoding="utf-8") if origin else None
    return unsupported_for_source(str(getattr(cfg, "model_type", "")), source, attn)


def collate_packed(examples: list, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """The rows of ``examples`` as one sequence: ``input_ids``, ``position_ids``, ``labels`` (the
    next-token targets within each row, -100 at its last token) ``[1, L]`` and ``row_index [L]``
    (which row each position belongs to). ``pad_id`` is unused: there is no padding."""
    ids, pos, labels, row = [], [], [], []
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids
        pos += range(n)
        labels += [*e.labels[1:], -100]  # position t predicts token t+1 of the same row
        row += [i] * n
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {
        "input_ids": as_long(ids)[None],
        "position_ids": as_long(pos)[None],
        "labels": as_long(labels)[None],
        "row_index": as_long(row),
    }


def segment_sum(values: torch.Tensor, row_index: torch.Tensor, rows: int) -> torch.Tensor:
    """``values [L]`` summed per row (``row_index [L]``): ``[rows]`` (differentiable)."""
    out = torch.zeros(rows, dtype=values.dtype, device=values.device)
    return out.index_add(0, row_index.to(values.device), values)
