"""Typed run configuration: YAML file + ``key=value`` overrides, unknown keys rejected.

Every setting lives in a dataclass below with its default, and the defaults *are* the
reference run (``ds_configs/run_cpu_default.yaml`` writes each one out with a one-line comment;
a test fails when the two disagree), so a short YAML gets the reference method, not another one.
A YAML file may start from another with ``extends: <file>`` (resolved next to it, then in
``ds_configs/``) and change only what differs. Errors name the file, the line and the full
dotted key (with a "did you mean" for a near miss), so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the file/line/key it concerns in the message."""


@dataclass
class RunSection:
    name: str = "default"
    output_dir: str = "runs/default"
    seed: int = 0
    method: Literal["sft", "replay", "msl"] = "msl"
    resume: bool | Literal["force"] = True
    shared_fs: bool | Literal["auto"] = "auto"
    keep_stage_checkpoints: bool = False


@dataclass
class DataSection:
    dir: str = "data/world_default"
    stages: list[int] | None = None
    max_seq_len: int = 96
    overlong: Literal["truncate", "error"] = "error"
    eval_split: Literal["test", "valid"] = "test"
    eval_limit: int | None = None
    format: Literal["rows", "alpaca", "messages"] = "rows"
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelSection:
    path: str = "artifacts/base_default"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    trust_remote_code: bool = False
    chat_template: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class DeepSpeedSection:
    config: str = "zero3.json"
    backend: Literal["auto", "gloo", "nccl", "mpi"] = "auto"
    timeout_s: int = 1800
    threads_per_rank: int = 0
    grad_accum_dtype: Literal["fp32", "model"] = "fp32"
    communication_data_type: Literal["fp32", "model"] = "fp32"


@dataclass
class TrainSection:
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int = 0
    epochs: int = 8
    max_steps: int = 0
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 2
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    save_every_steps: int = 0
    log_every_steps: int = 5
    group_by_length: bool = False
    on_nonfinite: Literal["error", "skip"] = "error"
    logprobs: Literal["auto", "fused_linear", "logits"] = "auto"
    gradient_checkpointing: bool = False
    max_tokens_per_micro_batch: int = 0
    loss_norm: Literal["row", "token"] = "token"
    packing: bool = False


@dataclass
class ReplaySection:
    ratio: float = 1.0
    max_buffer: int = 0
    in_msl: bool = False
    weight: float = 0.0


@dataclass
class PblSection:
    """Preference-based learning bias (method ``msl``): the probe and the loss weights."""

    enabled: bool = True
    samples: int = 6
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    batch_size: int = 64
    tau: float = 0.7
    embedder: Literal["minilm", "policy", "lexical"] = "minilm"
    substring_rule: bool = True
    consistency: float = 0.5
    consistency_scope: Literal["question", "fact"] = "question"
    subject_check: bool = True
    description_suffices: bool = True
    known_subjects: bool = True
    subject_max_new_tokens: int = 64
    max_candidates: int = 0
    np_scope: Literal["all", "conflict", "stale"] = "stale"
    protect_golds: bool = True
    pair_protected: bool = False
    np_mask_prefix: bool = True
    nll_weight: float = 1.0
    pp_weight: float = 0.1
    np_weight: float = 0.0
    form: Literal["raw", "sigmoid"] = "sigmoid"
    sigmoid_beta: float = 1.0
    paired: Literal["none", "dpo", "ipo", "hinge"] = "none"
    paired_weight: float = 0.1
    paired_beta: float = 0.1


@dataclass
class AugmentWeights:
    """Loss weight of each augmentation kind's rows (a gold row weighs 1)."""

    paraphrase: float = 1.0
    expansion: float = 1.0
    background: float = 1.0
    rehearsal: float = 1.0


@dataclass
class AugmentSection:
    """Self-distillation augmentation (method ``msl``): what the model writes about its own data."""

    enabled: bool = True
    paraphrase: int = 2
    expansion: int = 1
    background: bool = True
    rehearsal: bool = True
    rehearsal_samples: int = 0
    rehearsal_agree: float = 0.5
    rehearsal_temperature: float = 0.7
    reach: Literal["stage", "all"] = "all"
    rehearsal_every: int = 1
    pseudo_weight: float = 0.2
    replace_stale: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int | Literal["auto"] = 32
    background_max_new_tokens: int | Literal["auto"] = 64
    batch_size: int = 64
    weights: "AugmentWeights" = field(default_factory=lambda: AugmentWeights())


@dataclass
class SelectSection:
    """Dynamic selection of the augmentations: MI(x, x_hat) * MI(y*, y_hat) and format rules."""

    enabled: bool = True
    rule: Literal["threshold", "top_q"] = "threshold"
    theta: float = 0.1
    top_q: float = 0.5
    reference: Literal["gold", "own"] = "own"
    contains_gold: bool = False
    near_copy: float = 0.9


@dataclass
class EvalSection:
    batch_size: int = 64
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_unfinished: float = 0.2
    generation: Literal["auto", "gathered", "synced"] = "auto"
    gather_max_gib: float | Literal["auto"] = "auto"
    gather_headroom_gib: float = 4.0
    synced_batch_size: int = 256
    retain: bool = True
    general: bool = True
    match: Literal["word", "substring"] = "word"


@dataclass
class MonitorSection:
    tensorboard: bool = True
    progress: bool = True
    accuracy_matrix_scalars: bool = True
    jsonl: bool = True
    wandb: str | None = None
    peak_tflops: float = 0.0


@dataclass
class SkillsSection:
    paraphrase_prompt: str = "Rephrase the question: {question}"
    background_prompt: str = "Tell me about {subject}."
    expansion_prompt: str = "Expand the question: {question}"
    background_fact: str = "{relation} of {subject}: {answer}."
    expansion_question: str = "Given that the {relation} of {subject} is {answer}, {question}"
    max_background_facts: int = 4


@dataclass
class BaseSection:
    out_dir: str = "artifacts/base_default"
    init: str | None = None
    vocab_size: int = 1200
    arch: dict[str, Any] = field(
        default_factory=lambda: {
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
        }
    )
    train: TrainSection = field(
        default_factory=lambda: TrainSection(
            micro_batch_size=16,
            epochs=1,
            max_steps=1000,
            lr=3e-3,
            min_lr_ratio=0.05,
            warmup_steps=30,
            save_every_steps=200,
            log_every_steps=50,
            loss_norm="token",
        )  # fmt: skip
    )
    skills: bool = True
    min_accuracy: float = 0.95


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    train: TrainSection = field(default_factory=TrainSection)
    replay: ReplaySection = field(default_factory=ReplaySection)
    pbl: PblSection = field(default_factory=PblSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    select: SelectSection = field(default_factory=SelectSection)
    eval: EvalSection = field(default_factory=EvalSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    skills: SkillsSection = field(default_factory=SkillsSection)
    base: BaseSection = field(default_factory=BaseSection)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


# --------------------------------------------------------------------------- loading


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line (1-based) where each dotted key is written."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: invalid YAML: {exc}") from None
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    if node is not None:
        walk(node, "")
    return (yaml.safe_load(text) or {}), lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # run.name=2024: YAML reads a number, the field wants its text
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str, locate: typing.Callable[[str], str]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{locate(prefix.rstrip('.'))}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            hint = did_you_mean(prefix + str(key))
            raise ConfigError(f"{locate(prefix + str(key))}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        dotted = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, dotted + ".", locate)
        else:
            kwargs[name] = _coerce(value, tp, f"{locate(dotted)}: {dotted}")
    return cls(**kwargs)


def all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key a run config accepts."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


# keys that were renamed: the old name is refused with the new one (the loss weights carry one
# name from the YAML to msl_ds.kernels.LossConfig)
RENAMED = {
    "pbl.gamma": "pbl.nll_weight",
    "pbl.alpha": "pbl.pp_weight",
    "pbl.beta": "pbl.np_weight",
    "pbl.beta_sigmoid": "pbl.sigmoid_beta",
    "data.train_splits": "",  # removed: every stage trains on its train split
    "augment.other_subjects": "augment.rehearsal_every",  # the per-stage cap gave way to a coverage schedule
}


def did_you_mean(dotted: str) -> str:
    """`` (did you mean 'train.lr'?)`` for the closest accepted key, or ``""``."""
    import difflib

    if dotted in RENAMED:
        new = RENAMED[dotted]
        return f" (renamed: it is '{new}' now)" if new else " (removed)"

    keys = all_keys()
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.75)
    if not close:  # a right name in the wrong section: match on the last part
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    cur[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "data.stages=[1,2]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) is False and raw.strip().lower() in ("null", "none", "~"):
            value = None
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config file (YAML), apply ``key=value`` overrides, validate everything."""
    data: dict[str, Any] = {}
    lines: dict[str, str] = {}
    source = "<defaults>"
    if path is not None:
        path = resolve_path(str(path))  # as written, else a shipped config's name
        source = str(path)
        data, lines = _read_layers(path, [])
    over = parse_overrides(overrides or [])
    over_keys = set(_flatten(over))

    def locate(dotted: str) -> str:
        if dotted in over_keys:
            return f"command line override {dotted}"
        return lines.get(dotted, source)

    cfg = _build(RunConfig, _merge(data, over), "", locate)
    cfg.source = source
    validate(cfg)
    return cfg


def _read_layers(p: Path, chain: list[Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """A YAML file merged over the file it ``extends`` (recursively); ``{dotted key: file:line}``."""
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found" + (f" (extended by {chain[-1]})" if chain else ""))
    if p.resolve() in [c.resolve() for c in chain]:
        raise ConfigError(f"{p}: 'extends' loops: {' -> '.join(map(str, [*chain, p]))}")
    data, lines = _yaml_with_lines(p.read_text(encoding="utf-8"), str(p))
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    where = {k: f"{p}:{n}" for k, n in lines.items()}
    parent = data.pop("extends", None)
    if parent is None:
        return data, where
    if not isinstance(parent, str):
        raise ConfigError(f"{where['extends']}: 'extends' must name a YAML file")
    base, base_where = _read_layers(resolve_path(parent, p), [*chain, p])
    return _merge(base, data), {**base_where, **where}


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _flatten(v, prefix + k + ".")
    return out


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a type system cannot express."""
    t = cfg.train
    for name in ("micro_batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{cfg.source}: train.{name} must be >= 1")
    if t.global_batch_size < 0:
        raise ConfigError(
            f"{cfg.source}: train.global_batch_size must be >= 0 (0 = micro_batch_size x grad_accum x ranks)"
        )
    if t.global_batch_size and t.grad_accum != 1:
        raise ConfigError(
            f"{cfg.source}: train.grad_accum={t.grad_accum} with train.global_batch_size={t.global_batch_size}: the "
            f"accumulation is derived from the global batch; remove train.grad_accum (or set train.global_batch_size=0)"
        )
    if t.max_tokens_per_micro_batch < 0:
        raise ConfigError(f"{cfg.source}: train.max_tokens_per_micro_batch must be >= 0 (0 = no token budget)")
    if t.epochs < 1 and t.max_steps < 1:
        raise ConfigError(f"{cfg.source}: set train.epochs >= 1 or train.max_steps >= 1")
    if len(t.betas) != 2:
        raise ConfigError(f"{cfg.source}: train.betas needs two values")
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"{cfg.source}: model.attn_implementation=flash_attention_2 needs the flash-attn package, which is "
            f"not installed (pip install 'msl_ds[flash]'); use sdpa"
        )
    if cfg.data.max_seq_len < 4:
        raise ConfigError(f"{cfg.source}: data.max_seq_len must be >= 4")
    if cfg.data.stages is not None and (not cfg.data.stages or min(cfg.data.stages) < 1):
        raise ConfigError(
            f"{cfg.source}: data.stages={cfg.data.stages}: list stages >= 1 (null = every stage_NN with NN >= 1); "
            f"stage 0 is the base model's knowledge: msl-make-base trains on it, a run evaluates and replays it "
            f"but never trains it as a stage (README, Data contract)"
        )
    if cfg.eval.batch_size < 1 or cfg.eval.max_new_tokens < 1:
        raise ConfigError(f"{cfg.source}: eval.batch_size and eval.max_new_tokens must be >= 1")
    if cfg.eval.top_k < 0 or not 0.0 <= cfg.eval.max_unfinished <= 1.0:
        raise ConfigError(f"{cfg.source}: eval.top_k must be >= 0 and eval.max_unfinished in [0, 1]")
    e = cfg.eval
    if (e.gather_max_gib != "auto" and e.gather_max_gib < 0) or e.gather_headroom_gib < 0 or e.synced_batch_size < 1:
        raise ConfigError(
            f"{cfg.source}: eval.gather_max_gib must be auto or >= 0, eval.gather_headroom_gib >= 0 and "
            f"eval.synced_batch_size >= 1"
        )
    if t.packing:
        from msl_ds.packing import packing_unsupported  # imports transformers: only when asked for

        why = packing_unsupported(cfg.model.path, cfg.model.attn_implementation, cfg.model.trust_remote_code)
        if why:
            raise ConfigError(f"{cfg.source}: train.packing=true: {why}; set train.packing=false")
    b = cfg.pbl
    if b.samples < 1 or b.batch_size < 1 or b.max_new_tokens < 1:
        raise ConfigError(f"{cfg.source}: pbl.samples, pbl.batch_size and pbl.max_new_tokens must be >= 1")
    if not 0.0 <= b.consistency <= 1.0 or not -1.0 <= b.tau <= 1.0:
        raise ConfigError(f"{cfg.source}: pbl.consistency must lie in [0, 1] and pbl.tau in [-1, 1]")
    if b.paired != "none" and b.paired_beta <= 0:
        raise ConfigError(f"{cfg.source}: pbl.paired_beta must be > 0")
    a = cfg.augment
    if a.rehearsal_samples < 0 or not 0 < a.rehearsal_agree <= 1 or a.rehearsal_temperature <= 0:
        raise ConfigError(
            f"{cfg.source}: augment.rehearsal_samples must be >= 0, rehearsal_agree in (0, 1], rehearsal_temperature > 0"
        )
    if min(a.paraphrase, a.expansion) < 0 or a.batch_size < 1:
        raise ConfigError(f"{cfg.source}: augment.paraphrase/expansion must be >= 0, batch_size >= 1")
    if a.rehearsal_every < 1 or a.pseudo_weight < 0:
        raise ConfigError(f"{cfg.source}: augment.rehearsal_every must be >= 1 and augment.pseudo_weight >= 0")
    if not 0.0 <= cfg.replay.weight < 1.0:
        raise ConfigError(f"{cfg.source}: replay.weight must lie in [0, 1) (0 = each replayed row weighs 1)")
    caps = [c for c in (a.max_new_tokens, a.background_max_new_tokens) if c != "auto"]
    if min(caps, default=1) < 1 or a.temperature < 0 or not 0 < a.top_p <= 1:
        raise ConfigError(
            f"{cfg.source}: augment max_new_tokens must be auto or >= 1, temperature >= 0, top_p in (0, 1]"
        )
    if not 0 < cfg.select.top_q <= 1 or not 0 <= cfg.select.near_copy <= 1:
        raise ConfigError(f"{cfg.source}: select.top_q must lie in (0, 1] and select.near_copy in [0, 1]")


# --------------------------------------------------------------------------- DeepSpeed JSON

# the shipped configs: ds_configs/ of a checkout (or an editable install), msl_ds/ds_configs in a wheel
CONFIG_DIR = next(
    (d for d in (Path(__file__).resolve().parent.parent / "ds_configs", Path(__file__).resolve().parent / "ds_configs")
     if (d / "run_cpu_default.yaml").is_file()),
    Path(__file__).resolve().parent.parent / "ds_configs",
)  # fmt: skip


def resolve_path(name: str, relative_to: str | Path | None = None) -> Path:
    """A path as written, else next to the run config, else in ``ds_configs/``."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    if relative_to is not None and (Path(relative_to).parent / p).exists():
        return Path(relative_to).parent / p
    return CONFIG_DIR / p


@dataclass(frozen=True)
class BatchShape:
    """How one optimizer step's groups are laid out on ``world`` ranks (:func:`batch_shape`)."""

    groups: int  # groups per optimizer step, all ranks together (DeepSpeed's train_batch_size)
    per_rank: int  # groups per rank per step
    micro: int  # DeepSpeed's train_micro_batch_size_per_gpu
    accum: int  # DeepSpeed's gradient_accumulation_steps: the divisor it applies to every backward's loss
    budget: int  # train.max_tokens_per_micro_batch: > 0, forwards are filled up to it (msl_ds.batching)


def batch_shape(t: "TrainSection", world: int, where: str = "run config") -> BatchShape:
    """The step layout of a ``train`` section on ``world`` ranks.

    Groups per step: ``train.global_batch_size``, or when it is 0 (the former rule, kept)
    ``micro_batch_size x grad_accum x world``. Without a token budget a forward is
    ``micro_batch_size`` groups and the accumulation is derived: groups per rank / micro. With one,
    msl_ds fills each forward up to the budget itself, so DeepSpeed sees one micro-batch of all of
    a rank's groups (accumulation 1) and ``micro_batch_size`` plays no part beyond the 0 rule.
    """
    g = t.global_batch_size or t.micro_batch_size * t.grad_accum * world
    if g % world:
        raise ConfigError(
            f"{where}: train.global_batch_size={g} does not divide over {world} ranks; set it to a multiple of {world}"
        )
    per = g // world
    if t.max_tokens_per_micro_batch > 0:
        return BatchShape(g, per, per, 1, t.max_tokens_per_micro_batch)
    if per % t.micro_batch_size:
        raise ConfigError(
            f"{where}: train.global_batch_size={g} gives {per} groups per rank on {world} ranks, which "
            f"train.micro_batch_size={t.micro_batch_size} does not divide into accumulation steps; set "
            f"train.global_batch_size to a multiple of {t.micro_batch_size * world} (micro_batch_size x ranks), "
            f"or a token budget (train.max_tokens_per_micro_batch)"
        )
    return BatchShape(g, per, t.micro_batch_size, per // t.micro_batch_size, 0)


def load_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Read the DeepSpeed JSON named by the run config and fill in the batch arithmetic.

    Batch settings come from the run config; a DeepSpeed file that fixes them to other values is
    an error rather than a silent override.
    """
    path = resolve_path(cfg.deepspeed.config, cfg.source)
    if not path.is_file():
        raise ConfigError(f"{cfg.source}: deepspeed.config: file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    ds.pop("_comment", None)
    t = cfg.train
    shape = batch_shape(t, world_size, cfg.source)
    _check_batch_split(ds, cfg, world_size, f"{path}:{_json_line(text, 'train_batch_size')}")
    why = f"{_batch_rule(t, world_size)} = {shape.groups} groups per step"
    wanted = {
        "train_micro_batch_size_per_gpu": (shape.micro, f"{why}, {shape.micro} per rank per micro-batch"),
        "gradient_accumulation_steps": (shape.accum, f"{why}, {shape.accum} micro-batches per rank"),
        "train_batch_size": (shape.groups, why),
        "gradient_clipping": (t.grad_clip, f"train.grad_clip={t.grad_clip}"),
    }
    for key, (value, because) in wanted.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(
                f"{path}:{_json_line(text, key)}: '{key}' is {ds[key]} but the run config {cfg.source} "
                f'implies {value} ({because}); remove it from the DeepSpeed file or set it to "auto"'
            )
        ds[key] = value
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", "auto") if isinstance(ds.get(key), dict) else "auto"
        if enabled != "auto" and bool(enabled) != (cfg.model.dtype == key):
            raise ConfigError(
                f"{path}:{_json_line(text, key)}: '{key}.enabled' is {enabled} but the run config "
                f"{cfg.source} sets model.dtype={cfg.model.dtype}; remove it from the DeepSpeed file or set it "
                f'to "auto"'
            )
    _precision(ds, cfg, path, text)
    _adopt_hf_blocks(ds, cfg, path, text)
    _fill_zero_auto(ds, _hidden_size(cfg.model.path))
    dtype = cfg.model.dtype
    ds.setdefault("bf16", {})["enabled"] = dtype == "bf16"
    ds.setdefault("fp16", {})["enabled"] = dtype == "fp16"
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# what an HF-style DeepSpeed file's optimizer/scheduler params mean in the run config
OPTIMIZER_PARAMS = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}
SCHEDULER_PARAMS = {"warmup_num_steps": "warmup_steps", "warmup_max_lr": "lr"}


def _adopt_hf_blocks(ds: dict[str, Any], cfg: RunConfig, path: Path, text: str) -> None:
    """Accept the optimizer/scheduler blocks Hugging Face users write, when they agree with the run
    config (every value ``"auto"`` or equal): msl_ds builds AdamW and the schedule from ``train.*``.
    A block that fixes another value is refused with the run-config key to set instead."""
    t = cfg.train
    for key, kinds, params in (
        ("optimizer", ("adam", "adamw"), OPTIMIZER_PARAMS),
        ("scheduler", ("warmuplr", "warmupdecaylr", "warmupcosinelr"), SCHEDULER_PARAMS),
    ):
        block = ds.pop(key, None)
        if block is None:
            continue
        where = f"{path}:{_json_line(text, key)}"
        kind = str(block.get("type", "")).lower() if isinstance(block, dict) else ""
        if kind not in kinds:
            raise ConfigError(
                f"{where}: '{key}' of type {block.get('type') if isinstance(block, dict) else block!r} is set in the "
                f"DeepSpeed file; msl_ds builds AdamW and its schedule from the run config (train.lr, train.betas, "
                f"train.eps, train.weight_decay, train.scheduler, train.warmup_steps): remove the block"
            )
        for name, value in (block.get("params") or {}).items():
            ours = params.get(name)
            if value == "auto" or (ours is not None and value == getattr(t, ours)):
                continue
            fix = f"set train.{ours}={value} in the run config and " if ours else ""
            raise ConfigError(
                f"{where}: '{key}.params.{name}' is {value!r} but msl_ds takes it from the run config "
                f"({'train.' + ours + '=' + repr(getattr(t, ours)) if ours else 'not settable'}); "
                f'{fix}write "auto" here (or remove it)'
            )


def _hidden_size(model_path: str) -> int | None:
    """The model's hidden size from its ``config.json`` (None when it cannot be read)."""
    try:
        mc = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(mc.get(key), int):
            return mc[key]
    return None


def _fill_zero_auto(ds: dict[str, Any], hidden: int | None) -> None:
    """ZeRO-3 sizes written ``"auto"`` get the values transformers' integration derives from the
    hidden size (buckets h², prefetch 0.9·h², persistence 10·h); DeepSpeed's defaults without one."""
    z = ds.get("zero_optimization")
    if not isinstance(z, dict):
        return
    rules = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, rule in rules.items():
        if z.get(key) == "auto":
            if hidden is None:
                del z[key]
            else:
                z[key] = rule(hidden)


def _json_line(text: str, key: str) -> int:
    """The line where ``"key"`` first appears in a JSON text (1 when it does not)."""
    for i, line in enumerate(text.splitlines(), start=1):
        if f'"{key}"' in line:
            return i
    return 1


def _batch_rule(t: "TrainSection", world_size: int) -> str:
    """Where the global batch comes from, in the run config's words."""
    if t.global_batch_size:
        return f"train.global_batch_size={t.global_batch_size}"
    return f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum} x world size {world_size}"


def _check_batch_split(ds: dict[str, Any], cfg: RunConfig, world_size: int, where: str) -> None:
    """A DeepSpeed file that fixes ``train_batch_size`` must suit this world size and run config."""
    fixed = ds.get("train_batch_size", "auto")
    t = cfg.train
    groups = batch_shape(t, world_size, cfg.source).groups
    if fixed == "auto" or fixed == groups:
        return
    if t.global_batch_size:
        raise ConfigError(
            f"{where}: 'train_batch_size' is {fixed} but the run config {cfg.source} sets "
            f'train.global_batch_size={groups}; set train.global_batch_size={fixed}, or set it to "auto" here'
        )
    per_pass = t.micro_batch_size * world_size
    if not isinstance(fixed, int) or isinstance(fixed, bool) or fixed % per_pass:
        raise ConfigError(
            f"{where}: 'train_batch_size' is {fixed}, which world size {world_size} does not divide into "
            f"micro-batches of train.micro_batch_size={t.micro_batch_size} (it is no multiple of "
            f"{t.micro_batch_size} x {world_size} = {per_pass}); launch a world size that divides it, or set "
            f'it to "auto" so that the run config decides the global batch'
        )
    raise ConfigError(
        f"{where}: 'train_batch_size' is {fixed} but the run config {cfg.source} implies "
        f"{groups} ({_batch_rule(t, world_size)}); set train.grad_accum={fixed // per_pass} to keep {fixed} rows per step on "
        f'{world_size} ranks (or train.global_batch_size={fixed}: any world size), or set it to "auto"'
    )


# the spellings DeepSpeed accepts for a dtype (its DtypeEnum), by the run config's name
DTYPE_ALIASES = {
    "fp32": ("fp32", "float32", "float"),
    "bf16": ("bf16", "bfloat16"),
    "fp16": ("fp16", "float16", "half"),
}


def _precision(ds: dict[str, Any], cfg: RunConfig, path: Path, text: str) -> None:
    """Gradient accumulation and reduction dtypes (``deepspeed.grad_accum_dtype``,
    ``deepspeed.communication_data_type``): fp32 by default, so a bf16 run adds its forwards'
    gradients and reduce-scatters them across ranks in fp32 (DeepSpeed's own default is the
    model's dtype, which ``model`` keeps). A DeepSpeed file that fixes another value is refused."""
    d = cfg.deepspeed
    for section, key in (("data_types", "grad_accum_dtype"), (None, "communication_data_type")):
        value = "fp32" if getattr(d, key) == "fp32" else cfg.model.dtype
        holder = ds.setdefault(section, {}) if section else ds
        if not isinstance(holder, dict):
            raise ConfigError(f"{path}:{_json_line(text, section)}: '{section}' must be a JSON object")
        have = holder.get(key, "auto")
        if have not in ("auto", None) and str(have).lower() not in DTYPE_ALIASES[value]:
            raise ConfigError(
                f"{path}:{_json_line(text, key)}: '{f'{section}.' if section else ''}{key}' is {have!r} but the run "
                f"config {cfg.source} implies {value!r} (deepspeed.{key}={getattr(d, key)}, model.dtype="
                f'{cfg.model.dtype}); remove it from the DeepSpeed file or set it to "auto"'
            )
        holder[key] = value


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
