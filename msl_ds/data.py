"""Stage data: loading and validating the data layout (README "Data contract"), tokenising, batch plans.

A world directory holds ``stage_NN/{train,valid,test}.{jsonl,parquet}`` plus optional
``retain`` and ``general`` files. Rows need ``question`` and ``answer`` (the authors'
``Question``/``Answer`` work too). Every problem is reported with file, line and field before
anything is written.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msl_ds.chat import TemplateError, encode_turn
from msl_ds.config import batch_shape
from msl_ds.datafiles import ROWS, DataError, DataSource, find_file, read_records, to_row
from msl_ds.facts import WorldState, fact_key, has_identity
from msl_ds.kernels import ROLE_CONFLICT, ROLE_GOLD, ROLE_IGNORE

log = logging.getLogger(__name__)
OPTIONAL_FIELDS = ("id", "fact_id", "subject", "relation", "previous_answer", "kind")
STAGE_RE = re.compile(r"^stage_(\d+)$")


# --------------------------------------------------------------------------- files


def stage_dirs(root: str | Path) -> dict[int, Path]:
    """``{stage index: directory}`` of every ``stage_NN`` under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.dir: {root} is not a directory")
    out = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := STAGE_RE.match(p.name))}
    if not out:
        raise DataError(f"data.dir: {root} has no stage_NN directories")
    return dict(sorted(out.items()))


def normalise_row(obj: dict[str, Any], where: str, default_id: str, source: DataSource = ROWS) -> dict[str, Any]:
    """Convert the user's format and columns, check the required fields, keep known optional ones."""
    row = to_row(obj, source, where)
    for name in ("question", "answer"):
        if name not in row or row[name] is None:
            raise DataError(f"{where}: field '{name}' is missing")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
        if not row[name].strip():
            raise DataError(f"{where}: field '{name}' is empty")
    out = {"question": row["question"].strip(), "answer": row["answer"].strip()}
    for name in OPTIONAL_FIELDS:
        value = row.get(name)
        if value is not None:
            if not isinstance(value, (str, int)):
                raise DataError(f"{where}: field '{name}' must be a string")
            out[name] = str(value)
    out.setdefault("id", default_id)
    return out


def load_rows(path: str | Path, required: bool = True, source: DataSource = ROWS) -> list[dict[str, Any]]:
    """Validated rows of one split (any kind of file ``msl_ds.datafiles`` reads)."""
    p = Path(path)
    if not p.exists():
        if required:
            raise DataError(f"{p}: file not found")
        return []
    records = read_records(p)
    if not records:
        raise DataError(f"{p}: no rows (an empty file)")
    stem = f"{p.parent.name}/{p.stem if p.is_file() else p.name}"
    rows = [normalise_row(obj, where, f"{stem}/{k}", source) for k, (where, obj) in enumerate(records, start=1)]
    check_ids(rows, p, [where.rsplit(":", 1)[-1].strip() for where, _ in records])
    keyless = sum(not has_identity(r) for r in rows)
    if keyless:
        log.warning(
            "%s: %d of %d rows have neither 'fact_id' nor 'subject'+'relation': each is its own fact, "
            "and a later stage can never supersede it",
            p, keyless, len(rows),
        )  # fmt: skip
    return rows


def check_ids(rows: list[dict[str, Any]], path: Path, lines: list | None = None) -> None:
    """Refuse an id given twice with different answers (``lines``: each row's line number)."""
    lines = lines or list(range(1, len(rows) + 1))
    seen: dict[str, tuple[int, str]] = {}
    for i, r in zip(lines, rows):
        prev = seen.get(r["id"])
        if prev is not None and prev[1] != r["answer"]:
            raise DataError(
                f"{path}:{i}: field 'id' {r['id']!r} repeats line {prev[0]} with a different answer "
                f"({r['answer']!r} vs {prev[1]!r})"
            )
        seen[r["id"]] = (i, r["answer"])


@dataclass
class World:
    """The files of one data directory, validated up front.

    ``retain`` and ``general`` are the fixed probes of the evaluation split the world was loaded
    for (``retain.jsonl`` / ``general.jsonl`` for test, ``retain_valid.jsonl`` /
    ``general_valid.jsonl`` for valid); ``read`` lists every file that was opened.
    """

    root: Path
    stages: dict[int, dict[str, list[dict[str, Any]]]]
    retain: list[dict[str, Any]]
    general: list[dict[str, Any]]
    files: dict[tuple[int, str], Path] = field(default_factory=dict)  # (stage, split) -> its file
    read: list[Path] = field(default_factory=list)

    def split(self, stage: int, name: str) -> list[dict[str, Any]]:
        return self.stages[stage].get(name, [])

    def train_before(self, stage: int) -> list[dict[str, Any]]:
        """The training rows of every stage before ``stage`` (stage 0 included), in stage order."""
        return [r for s in sorted(self.stages) if s < stage for r in self.split(s, "train")]

    def state(self, stage: int, splits: tuple[str, ...], stages: list[int] | None = None) -> WorldState:
        """The world state after ``stage``: every fact stated in ``splits`` of the stages up to it
        (with ``stages``, only those and stage 0: the stages a run trains on)."""
        keep = [s for s in self.stages if stages is None or s == 0 or s in stages]
        try:
            return WorldState.build([(s, [r for sp in splits for r in self.split(s, sp)]) for s in keep], stage)
        except ValueError as exc:
            raise DataError(f"{self.root}: {exc}") from None


def probe_file(root: Path, name: str, split: str) -> Path | None:
    """The ``retain``/``general`` probe file of an evaluation split (valid: ``<name>_valid``)."""
    return find_file(root, name if split == "test" else f"{name}_{split}")


def load_world(
    root: str | Path,
    splits: tuple[str, ...] = ("train", "valid", "test"),
    probe_split: str = "test",
    source: DataSource = ROWS,
) -> World:
    """Load and validate every stage's ``splits`` and the fixed probes of ``probe_split``.

    Nothing else is opened: a run that evaluates on ``valid`` never reads a test phrasing.
    ``source``: the rows' format and column names (``data.format``, ``data.columns``).
    """
    root = Path(root)
    stages: dict[int, dict[str, list[dict[str, Any]]]] = {}
    files: dict[tuple[int, str], Path] = {}
    for idx, d in stage_dirs(root).items():
        stages[idx] = {}
        for split in splits:
            f = find_file(d, split)
            if f is None:
                if split in ("train", "test") or split == probe_split:
                    raise DataError(
                        f"{d}: missing {split}.jsonl (or .json, .parquet, .csv, or a saved dataset {split}/)"
                    )
                continue
            stages[idx][split] = load_rows(f, source=source)  # an empty file is refused: every stage needs rows
            files[(idx, split)] = f
    probes = {name: probe_file(root, name, probe_split) for name in ("retain", "general")}
    loaded = {name: load_rows(f, source=source) if f else [] for name, f in probes.items()}
    read = [*files.values(), *(f for f in probes.values() if f)]
    return World(root=root, stages=stages, retain=loaded["retain"], general=loaded["general"], files=files, read=read)


# --------------------------------------------------------------------------- replay


def replay_rows(world: World, stage: int, n: int, max_buffer: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows replayed from the train data of stages before ``stage`` (true answers).

    Where a fact was updated later, only its newest answer is eligible: replaying a superseded
    answer would teach the very conflict the stage is resolving.
    """
    earlier = world.train_before(stage)
    latest = {fact_key(r): r["answer"] for r in earlier}  # later stages overwrite earlier ones
    current = {fact_key(r) for r in world.split(stage, "train")}
    pool = [r for r in earlier if fact_key(r) not in current and latest[fact_key(r)] == r["answer"]]
    rng = random.Random(seed * 7919 + stage)
    if max_buffer and len(pool) > max_buffer:
        pool = rng.sample(pool, max_buffer)
    if n >= len(pool):
        return list(pool)
    return rng.sample(pool, n)


def hold_replay_share(examples: list["Example"], share: float, loss_norm: str) -> float | None:
    """Give the replayed rows (``row["replayed"]``) one common loss weight such that they carry
    ``share`` of the stage's weighted answer tokens (``loss_norm`` token; of its weighted rows
    under ``row``), in place; returns that weight (None when ``share`` is 0 or nothing is replayed).

    Under the token-mean loss a row counts by its answer tokens, so replayed rows lose ground
    whenever augmentation adds rows; this keeps their share of every step, in expectation,
    where the protocol states it (``replay.weight``)."""

    def size(x: "Example") -> float:
        return 1.0 if loss_norm == "row" else float(sum(1 for t in x.labels if t != -100))

    replayed = [x for x in examples if x.row.get("replayed")]
    if not share or not replayed:
        return None
    mine = sum(size(x) for x in replayed)
    others = sum(x.weight * size(x) for x in examples if not x.row.get("replayed"))
    weight = share * others / ((1.0 - share) * mine) if mine else 0.0
    for x in replayed:
        x.weight = weight
    return weight


# --------------------------------------------------------------------------- tokenising & batches


@dataclass
class Example:
    """One training row, or a *group*: a prompt's gold answer with its probed candidates.

    A plain row is a group of one. Batches are planned over groups, so a prompt's candidates
    always share a micro-batch with its gold answer (paired losses need both).
    """

    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: loss on answer tokens only
    row: dict[str, Any]
    role: int = ROLE_GOLD  # the loss role (msl_ds.kernels ROLE_*)
    ref_logp: float = 0.0  # log pi_ref(answer | prompt), stored by the probe
    weight: float = 1.0  # loss weight of the row (augmentation kinds have their own)
    candidates: list["Example"] = field(default_factory=list)

    def rows(self) -> list["Example"]:
        return [self, *self.candidates]


def encode_example(tokenizer, row: dict[str, Any], max_len: int, overlong: str, where: str) -> Example:
    """A row as the model's chat template renders it (:func:`msl_ds.chat.encode_turn`), loss on the
    assistant's turn only; ``overlong=truncate`` cuts the prompt after its first token."""
    try:
        ids, start, stop = encode_turn(tokenizer, row["question"], row["answer"])
    except TemplateError as exc:
        raise DataError(f"{where}: row {row['id']!r}: {exc}") from None
    labels = [-100] * start + ids[start:stop] + [-100] * (len(ids) - stop)
    if len(ids) > max_len:
        cut = len(ids) - max_len
        if overlong == "error" or cut > start - 1:
            raise DataError(
                f"{where}: row {row['id']!r} is {len(ids)} tokens, longer than data.max_seq_len="
                f"{max_len} (set data.overlong=truncate to cut the prompt from the left)"
            )
        ids, labels = ids[:1] + ids[1 + cut :], labels[:1] + labels[1 + cut :]  # keep bos, cut the prompt's start
    return Example(input_ids=ids, labels=labels, row=row, weight=float(row.get("weight", 1.0)))


def encode_rows(tokenizer, rows: list[dict[str, Any]], max_len: int, overlong: str, where: str) -> list[Example]:
    return [encode_example(tokenizer, r, max_len, overlong, f"{where} id={r['id']}") for r in rows]


def check_lengths(world: World, tokenizer, max_len: int, overlong: str, splits: tuple[str, ...] = ("train",)) -> None:
    """Encode every stage's ``splits`` once, so an overlong row fails before any stage runs.

    Replay draws on every earlier stage, stage 0 included, so all stages are checked; the error
    names the file and the row's id (by default ``stage_NN/<split>/<line>``).
    """
    for (stage, split), path in sorted(world.files.items()):
        if split in splits:
            encode_rows(tokenizer, world.split(stage, split), max_len, overlong, str(path))


def batch_plan(
    n: int, micro: int, accum: int, world: int, epochs: int, max_steps: int, seed: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Global batches of example indices for a whole stage, identical on every rank.

    Each epoch is a fresh permutation; the last batch of an epoch is filled from the epoch's
    start so every step has full micro-batches. ``max_steps`` > 0 caps (or extends) the stage.
    With ``lengths``, each window of 16 global batches is sorted by length before it is cut
    and the batches are then shuffled: rows of similar length share a micro-batch, so less
    compute goes to padding, while every batch still comes from a random window.
    """
    gb = micro * accum * world
    g = torch.Generator().manual_seed(seed)
    steps: list[list[int]] = []
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        per_epoch = -(-n // gb)
        perm = (perm * (-(-gb * per_epoch // n)))[: gb * per_epoch]
        batches = [perm[i * gb : (i + 1) * gb] for i in range(per_epoch)]
        if lengths is not None:
            window = 16 * gb
            grouped = [sorted(perm[i : i + window], key=lambda j: lengths[j]) for i in range(0, len(perm), window)]
            flat = [j for w in grouped for j in w]
            batches = [flat[i * gb : (i + 1) * gb] for i in range(per_epoch)]
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        steps += batches
        epoch += 1
        if max_steps > 0 and len(steps) >= max_steps:
            return steps[:max_steps]
        if max_steps <= 0 and epoch >= epochs:
            return steps


def stage_plan(examples: list["Example"], train, world: int, seed: int) -> list[list[int]]:
    """The batch plan for ``examples`` under a ``train`` config section: steps of
    ``batch_shape(train, world).groups`` groups (with ``train.global_batch_size`` the same plan on
    any number of ranks)."""
    lengths = [len(e.input_ids) for e in examples] if train.group_by_length else None
    groups = batch_shape(train, world).groups  # the plan depends on the step's size only
    return batch_plan(len(examples), groups, 1, 1, train.epochs, train.max_steps, seed, lengths)


def micro_batches(global_batch: list[int], micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of a global batch (rank-interleaved)."""
    return [global_batch[(k * world + rank) * micro : (k * world + rank + 1) * micro] for k in range(accum)]


def collate(examples: list[Example], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-padded tensors; labels are already shifted to the next-token targets."""
    T = max(len(e.input_ids) for e in examples)
    # a checkpoint may set no pad id (Llama-3): padded positions are masked and unscored, any id does
    ids = torch.full((len(examples), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids)
        labels[i, : L - 1] = torch.tensor(e.labels[1:])  # position t predicts token t+1
        attn[i, :L] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def flatten(groups: list[Example]) -> tuple[list[Example], list[int], list[int]]:
    """A micro-batch of groups as rows, plus (gold, conflicting candidate) pair indices.

    A candidate with ``ROLE_IGNORE`` joins only its pair (no L_PP/L_NP term of its own).
    """
    rows: list[Example] = []
    chosen: list[int] = []
    rejected: list[int] = []
    for g in groups:
        gold = len(rows)
        rows.append(g)
        for c in g.candidates:
            if c.role in (ROLE_CONFLICT, ROLE_IGNORE) and g.role == ROLE_GOLD:
                chosen.append(gold)
                rejected.append(len(rows))
            rows.append(c)
    return rows, chosen, rejected
