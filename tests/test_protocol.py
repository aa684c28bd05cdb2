"""The pieces docs/PROTOCOL.md rests on, without launching a run: the paper's config, the method
list, what a run's JSON records, the replayed rows' share of the loss, and tools/rescore.py."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msl_ds.config import CONFIG_DIR, all_keys, load_config

REPO = Path(__file__).resolve().parent.parent
PAPER = CONFIG_DIR / "run_paper.yaml"
METHOD_SECTIONS = ("replay.", "pbl.", "augment.", "select.")


def _commented_keys(path: Path) -> dict[str, str]:
    """Every dotted key the YAML file writes, with its line's comment."""
    node = yaml.compose(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[str, str] = {}

    def walk(n, prefix: str) -> None:
        for k, v in n.value:
            key = f"{prefix}{k.value}"
            if isinstance(v, yaml.MappingNode):
                walk(v, key + ".")
            else:
                line = lines[k.start_mark.line]
                out[key] = line.split("#", 1)[1].strip() if "#" in line else ""

    walk(node, "")
    return out


def test_paper_config_writes_every_method_key_as_paper_or_gap():
    keys = _commented_keys(PAPER)
    written = {k for k in keys if k.startswith(METHOD_SECTIONS)}
    assert written == {k for k in all_keys() if k.startswith(METHOD_SECTIONS)}  # every key, none inherited
    for k in [*written, "run.method", "train.loss_norm"]:
        assert keys[k].startswith(("paper:", "gap:")), f"{k}: {keys[k]!r}"
    # the paper as written: raw L_PP/L_NP over Y_align/Y_conf at tau 0.7, nonzero alpha and beta,
    # the stage's own facts, MI against the gold, no protections, rehearsal or known-subject rule
    cfg = load_config(PAPER)
    b, a, s = cfg.pbl, cfg.augment, cfg.select
    assert (cfg.run.method, b.form, b.tau, b.np_scope, b.substring_rule) == ("msl", "raw", 0.7, "all", False)
    assert b.pp_weight > 0 and b.np_weight > 0 and b.paired == "none" and b.max_candidates == 0
    assert not (b.protect_golds or b.np_mask_prefix or b.known_subjects or b.pair_protected)
    assert (a.reach, a.rehearsal, a.replace_stale, s.reference, s.rule) == ("stage", False, False, "gold", "threshold")
    assert not cfg.replay.in_msl


def test_compare_methods_and_paper_overrides():
    from msl_ds.compare import METHODS, paper_overrides

    assert list(METHODS) == [
        "sft", "replay", "msl_paper", "msl", "msl_no_pbl", "msl_no_aug", "msl_no_select", "msl_replay",
    ]  # fmt: skip
    # msl_paper on top of any --config is run_paper.yaml's every method key
    over = load_config(CONFIG_DIR / "run_cpu_default.yaml", METHODS["msl_paper"]).to_dict()
    paper = load_config(PAPER).to_dict()
    for key in paper_overrides():
        section, *rest = key.split("=", 1)[0].split(".")
        got, want = over[section], paper[section]
        for part in rest:
            got, want = got[part], want[part]
        assert got == want, key
    assert over["pbl"] == paper["pbl"] and over["augment"] == paper["augment"] and over["select"] == paper["select"]
    rep = load_config(CONFIG_DIR / "run_cpu_default.yaml", METHODS["msl_replay"])
    assert rep.run.method == "msl" and rep.replay.in_msl and rep.replay.weight == 0.5


def test_code_commit_and_dirty_flag(tmp_path):
    from msl_ds.provenance import code_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "-C", str(repo), "add", "a.py"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "one"], check=True)
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_commit(repo)["commit"] == sha and code_commit(repo)["dirty"] is False
    (repo / "untracked.txt").write_text("results\n")  # untracked outputs do not make the code dirty
    assert code_commit(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert code_commit(repo) == {**code_commit(repo), "commit": sha, "dirty": True}
    # not a checkout (an installed package, or a folder inside someone else's repository)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert code_commit(plain)["commit"] is None and code_commit(plain)["dirty"] is None
    (repo / "sub").mkdir()
    assert code_commit(repo / "sub")["commit"] is None
    # this checkout's own code
    ours = code_commit()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert ours["commit"] == head.stdout.strip()


def test_run_record_is_the_effective_config():
    from msl_ds.provenance import run_record

    cfg = load_config(CONFIG_DIR / "run_cpu_tiny.yaml", ["train.lr=0.002"])
    rec = run_record(cfg)
    eff = rec["effective_config"]
    assert eff["train"]["lr"] == 0.002 and eff["run"]["method"] == "sft"  # an override and the tiny file
    assert eff["pbl"]["tau"] == 0.7 and eff["augment"]["rehearsal_every"] == 1  # inherited defaults, resolved
    leaves = {"data.columns", "base.arch"}  # mapping-valued keys

    def flat(d: dict, prefix: str = "") -> set[str]:
        return {
            k2 for k, v in d.items()
            for k2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) and f"{prefix}{k}" not in leaves else {prefix + k})
        }  # fmt: skip

    assert flat(eff) == set(all_keys())  # every key, nothing else
    assert json.loads(json.dumps(rec)) == rec and set(rec["commit"]) >= {"commit", "dirty"}


def _example(n_answer: int, replayed: bool, weight: float = 1.0):
    from msl_ds.data import Example

    return Example(
        [1] * (n_answer + 2), [-100, -100] + [5] * n_answer, {"id": "x", "replayed": replayed}, weight=weight
    )


def test_replayed_rows_hold_their_share_of_the_token_mean_loss():
    from msl_ds.data import hold_replay_share

    # stage rows: 3 + 5 answer tokens at weight 1, an augmentation of 4 tokens at weight 0.5 -> 10
    rows = [_example(3, False), _example(5, False), _example(4, False, 0.5), _example(2, True), _example(8, True)]
    w = hold_replay_share(rows, 0.25, "token")
    assert w == pytest.approx(0.25 * 10 / (0.75 * 10))
    replayed = sum(x.weight * 8 if i == 4 else x.weight * 2 for i, x in enumerate(rows) if x.row["replayed"])
    assert replayed / (replayed + 10) == pytest.approx(0.25)
    # row normalisation counts rows: 2 replayed rows against 2.5 weighted stage rows
    rows = [_example(3, False), _example(5, False), _example(4, False, 0.5), _example(2, True), _example(8, True)]
    assert hold_replay_share(rows, 0.5, "row") == pytest.approx(2.5 / 2)
    # off, or nothing replayed: weights untouched
    rows = [_example(3, False), _example(2, True)]
    assert hold_replay_share(rows, 0.0, "token") is None and [x.weight for x in rows] == [1.0, 1.0]
    assert hold_replay_share([_example(3, False)], 0.5, "token") is None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rescore_tool_recomputes_acc_world(tmp_path):
    """A hand-made world of two stages and a published run: acc_world by hand, and a wrong
    published number (or a changed answer) is caught."""
    world = tmp_path / "world"
    row = lambda i, f, a, **kw: {"id": i, "fact_id": f, "question": f"q {i}", "answer": a, **kw}  # noqa: E731
    _write_jsonl(world / "stage_00" / "train.jsonl", [row("0a", "A", "red"), row("0b", "B", "blue")])
    _write_jsonl(world / "stage_00" / "test.jsonl", [row("0a/t1", "A", "red"), row("0a/t2", "A", "red"),
                                                      row("0b/t1", "B", "blue")])  # fmt: skip
    _write_jsonl(world / "stage_01" / "train.jsonl", [row("1a", "A", "green", previous_answer="red")])
    _write_jsonl(world / "stage_01" / "test.jsonl", [row("1a/t1", "A", "green", previous_answer="red")])
    # after stage 1 A is green: the stage-0 rows of A are scored against green
    answers = [
        {"set": "stage_00", "id": "0a/t1", "output": "It is green."},  # right (current gold)
        {"set": "stage_00", "id": "0a/t2", "output": "red"},  # outdated
        {"set": "stage_00", "id": "0b/t1", "output": "Blue"},  # right
        {"set": "stage_01", "id": "1a/t1", "output": "green"},  # right
        {"set": "retain", "id": "r1", "output": "whatever"},  # not a stage set: not in acc_world
    ]
    pub = tmp_path / "pub" / "runs"
    pub.mkdir(parents=True)
    (pub / "msl_seed0.eval.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(a) + "\n" for a in answers).encode())
    )
    # fact A: mean(1, 0, 1) over its three phrasings; fact B: 1 -> (2/3 + 1) / 2
    want = (2 / 3 + 1) / 2
    stages = [{"stage": 1, "acc_world": want}]
    (pub / "msl_seed0.json").write_text(json.dumps({"stages": stages}))
    tool = [sys.executable, str(REPO / "tools" / "rescore.py"), "--data", str(world)]
    ok = subprocess.run([*tool, str(pub / "msl_seed0.json")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1])["acc_world"] == pytest.approx(want, abs=1e-12)
    (pub / "msl_seed0.json").write_text(json.dumps({"stages": [{"stage": 1, "acc_world": want + 0.01}]}))
    bad = subprocess.run([*tool, str(pub / "msl_seed0.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and "differs" in bad.stderr, bad.stderr
    # the run's eval.match decides: "Blueish" states "blue" as a substring, not as a whole word
    answers[2] = {"set": "stage_00", "id": "0b/t1", "output": "Blueish"}
    for rule, value in (("word", (2 / 3 + 0) / 2), ("substring", want)):
        name = f"msl_seed_{rule}"
        (pub / f"{name}.eval.jsonl.gz").write_bytes(
            gzip.compress("".join(json.dumps(a) + "\n" for a in answers).encode())
        )
        record = {"stages": [{"stage": 1, "acc_world": value}], "effective_config": {"eval": {"match": rule}}}
        (pub / f"{name}.json").write_text(json.dumps(record))
        res = subprocess.run([*tool, str(pub / f"{name}.json")], capture_output=True, text=True)
        assert res.returncode == 0, (rule, res.stderr)


def _protocol_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("protocol_tool", REPO / "tools" / "protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_protocol_grid_rule_picks_the_best_valid_mean(tmp_path):
    tool = _protocol_tool()
    means = {c: 0.50 for c in tool.GRID}
    means["msl/pp_weight_1"] = 0.52  # beats the shipped value by more than the tie margin
    means["msl/pp_weight_0"] = 0.51
    means["msl/theta_0.2"] = 0.503  # within the tie margin: the shipped theta stays
    means["msl/reference_gold"] = 0.56
    for cell, acc in means.items():
        (tmp_path / cell).mkdir(parents=True)
        summary = {"methods": {tool.GRID[cell][0]: {"acc_world": {"mean": acc}}}}
        (tmp_path / cell / "summary.json").write_text(json.dumps(summary))
    got = tool.pick(tmp_path)
    assert got["msl"]["overrides"] == ["pbl.pp_weight=1.0", "select.reference=gold"] and got["msl"]["confirm"]
    assert got["msl"]["best_single"] == "msl/reference_gold"
    assert got["msl_paper"]["overrides"] == [] and not got["msl_paper"]["confirm"]
    (tmp_path / "msl_paper/theta_0.2/summary.json").unlink()
    assert tool.pick(tmp_path)["msl_paper"] == {"missing": ["msl_paper/theta_0.2"]}
    # every cell runs on the valid split with 3 seeds; the test runs are the 8 methods on test
    cmds = tool.valid_commands()
    assert len(cmds) == len(tool.GRID) and all("valid" == c[c.index("--split") + 1] for c in cmds)
    assert all(c[c.index("--seeds") + 1 : c.index("--seeds") + 4] == ["0", "1", "2"] for c in cmds)
    part = tool.valid_commands(["msl_paper/*", "msl/base"], jobs=1)  # a part of the grid, one run in flight each
    assert [c[c.index("--publish") + 1].split("valid/")[1] for c in part] == ["msl/base"] + [
        c for c in tool.GRID if c.startswith("msl_paper/")
    ]
    assert all(c[c.index("--jobs") + 1] == "1" for c in part)
    with pytest.raises(SystemExit, match="match no grid cell"):
        tool.valid_commands(["msl/nope"])
    (test,) = tool.test_commands()
    assert test[test.index("--split") + 1] == "test" and test[test.index("--publish") + 1] == "docs/results/default"
    assert test[test.index("--methods") + 1 : test.index("--methods") + 9] == list(METHODS_ORDER)


METHODS_ORDER = ("sft", "replay", "msl_paper", "msl", "msl_no_pbl", "msl_no_aug", "msl_no_select", "msl_replay")


def test_protocol_test_step_refused_until_frozen_and_clean(tmp_path):
    tool = _protocol_tool()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "PROTOCOL.md").write_text("Defaults frozen: no\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], check=True)
    with pytest.raises(SystemExit, match="Defaults frozen: yes"):
        tool.frozen_or_exit(tmp_path)
    (tmp_path / "docs" / "PROTOCOL.md").write_text("Defaults frozen: yes\n")  # not committed: dirty
    with pytest.raises(SystemExit, match="uncommitted"):
        tool.frozen_or_exit(tmp_path)
    subprocess.run([*git, "commit", "-qam", "freeze"], check=True)
    tool.frozen_or_exit(tmp_path)  # frozen and clean: the test runs may start


def test_report_tool_pairs_and_targets(tmp_path):
    """tools/report.py on a hand-made published directory: per-seed differences, the sign test,
    the bootstrap interval and each target decided on the right numbers."""
    world, results = tmp_path / "world", tmp_path / "pub"
    facts = "ABCD"
    _write_jsonl(world / "stage_00" / "train.jsonl", [{"id": f, "fact_id": f, "answer": f"v{f}"} for f in facts])
    _write_jsonl(world / "stage_00" / "test.jsonl", [{"id": f"{f}/t", "fact_id": f, "answer": f"v{f}"} for f in facts])
    right = {"msl": "ABC", "sft": "A", "replay": "AB", "msl_replay": "AB", "msl_no_pbl": "ABC"}
    cover = {"msl": [1.0, 0.9]}
    for m, ok in right.items():
        for s in range(3):
            answers = [{"set": "stage_00", "id": f"{f}/t", "output": f"v{f}" if f in ok else "no"} for f in facts]
            (results / "runs").mkdir(parents=True, exist_ok=True)
            (results / "runs" / f"{m}_seed{s}.eval.jsonl.gz").write_bytes(
                gzip.compress("".join(json.dumps(a) + "\n" for a in answers).encode())
            )
            stages = [{"stage": 1, "rehearsal_subject_coverage": c, "aug_stale_accepted": 0} for c in cover.get(m, [])]
            record = {"stages": stages or [{"stage": 1}], "effective_config": {"data": {"eval_split": "test"}}}
            (results / "runs" / f"{m}_seed{s}.json").write_text(json.dumps(record))
    stat = lambda mean, std=0.0: {"mean": mean, "std": std, "seeds": [mean] * 3}  # noqa: E731
    summary = {
        "world": "w",
        "split": "test",
        "methods": {
            m: {
                "acc_world": stat(len(ok) / 4, 0.02 if m == "msl" else 0.0),
                "outdated_world": stat(0.2 if m == "msl_no_pbl" else 0.1),
                "general": stat(0.88),
                "conflict_recall": {"mean": None, "std": None, "seeds": [None] * 3},
            }
            for m, ok in right.items()
        },
    }  # fmt: skip  (NaN is written as null)
    (results / "summary.json").write_text(json.dumps(summary))
    (results / "base_metrics.json").write_text(json.dumps({"general_acc": 0.9, "stage_00_acc": 1.0}))
    res = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), "--results", str(results), "--data",
                          str(world), "--boot", "2000"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rep = json.loads((results / "report.json").read_text())
    pair = {(p["a"], p["b"]): p for p in rep["pairs"]}
    msl_sft = pair[("msl", "sft")]
    assert msl_sft["per_seed"] == [0.5] * 3 and msl_sft["signs"] == "+++" and msl_sft["sign_test_p"] == 1 / 8
    assert msl_sft["facts"] == 4 and msl_sft["fact_mean"] == 0.5  # fact differences 0, 1, 1, 0
    assert 0.0 <= msl_sft["boot95"][0] < 0.5 < msl_sft["boot95"][1] <= 1.0
    assert pair[("msl_replay", "replay")]["signs"] == "000" and pair[("msl_replay", "replay")]["sign_test_p"] == 1.0
    met = {t["target"].split(" ")[0] + t["target"].split(" ")[1]: t for t in rep["targets"]}
    assert met["msl>="]["met"] and met["msl>="]["difference"] == 0.5  # 0.75 - 0.25
    assert not met["msl_replay>="]["met"]  # equal: 0 < 3 points
    assert met["PBLlowers"]["met"] and met["PBLlowers"]["outdated_lowered"] == pytest.approx(0.1)
    assert met["mslgeneral"]["met"]  # 0.88 >= 0.9 - 0.05
    assert not met["rehearsalcoverage"]["met"] and met["rehearsalcoverage"]["min_coverage"] == 0.9
    assert "| msl − sft | +0.500, +0.500, +0.500 | +++ | 0.125 |" in (results / "report.md").read_text()
