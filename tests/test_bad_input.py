"""Bad input, one test per case: each error names the file, the line (where there is one) and the
field or key, and a run that fails validation writes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, deepspeed_cmd, run

from msl_ds.chat import answer_ids
from msl_ds.config import CONFIG_DIR, ConfigError, load_config, load_deepspeed_config
from msl_ds.data import DataError, check_lengths, encode_example, load_rows, load_world
from msl_ds.modeling import ModelError, build_tokenizer, check_model_dir, load_tokenizer

GOOD = '{"question": "Who leads Acme?", "answer": "Ann"}\n'


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refused(exc_type, fn, *args) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args)
    return str(e.value)


# --------------------------------------------------------------------------- data files


def test_malformed_json_line(tmp_path):
    p = write(tmp_path / "stage_01" / "train.jsonl", GOOD + '{"question": "q?", "answer": \n')
    msg = refused(DataError, load_rows, p)
    assert msg.startswith(f"{p}:2: malformed JSON") and "column" in msg


def test_missing_question(tmp_path):
    p = write(tmp_path / "stage_01" / "train.jsonl", GOOD + '{"answer": "Bob"}\n')
    assert refused(DataError, load_rows, p) == f"{p}:2: field 'question' is missing"


def test_missing_answer(tmp_path):
    p = write(tmp_path / "stage_01" / "train.jsonl", '{"question": "q?"}\n')
    assert refused(DataError, load_rows, p) == f"{p}:1: field 'answer' is missing"


def test_empty_answer(tmp_path):
    p = write(tmp_path / "stage_01" / "train.jsonl", GOOD + '{"question": "q?", "answer": "  "}\n')
    assert refused(DataError, load_rows, p) == f"{p}:2: field 'answer' is empty"


def test_field_of_wrong_type(tmp_path):
    p = write(tmp_path / "stage_01" / "train.jsonl", '{"question": 3, "answer": "a"}\n')
    assert refused(DataError, load_rows, p) == f"{p}:1: field 'question' must be a string, got int"


def test_line_not_an_object(tmp_path):
    p = write(tmp_path / "stage_01" / "train.jsonl", "[1, 2]\n")
    assert refused(DataError, load_rows, p) == f"{p}:1: expected a JSON object, got list"


def test_non_utf8_bytes(tmp_path):
    p = write(tmp_path / "train.jsonl", GOOD.encode() + b'{"question": "Who \xff?", "answer": "b"}\n')
    msg = refused(DataError, load_rows, p)
    assert msg.startswith(f"{p}:2: field 'question' not valid UTF-8 (byte 0xff")


def test_line_numbers_survive_unicode_line_separators(tmp_path):
    """U+2028 may stand raw in a JSON string; it must not split the line (and shift numbers)."""
    p = write(tmp_path / "train.jsonl", '{"question": "a\u2028b?", "answer": "x"}\n{"question": "q?"}\n')
    assert refused(DataError, load_rows, p) == f"{p}:2: field 'answer' is missing"


def test_empty_stage(tmp_path):
    """A stage whose train file has no rows (blank lines only) stops the whole world loading."""
    write(tmp_path / "stage_00" / "train.jsonl", GOOD)
    write(tmp_path / "stage_00" / "test.jsonl", GOOD)
    empty = write(tmp_path / "stage_01" / "train.jsonl", "\n\n")
    write(tmp_path / "stage_01" / "test.jsonl", GOOD)
    assert refused(DataError, load_world, tmp_path) == f"{empty}: no rows (an empty file)"


def test_duplicate_id_with_different_answers(tmp_path):
    rows = '{"id": "x", "question": "q?", "answer": "a"}\n\n{"id": "x", "question": "q2?", "answer": "b"}\n'
    p = write(tmp_path / "stage_01" / "train.jsonl", rows)
    msg = refused(DataError, load_rows, p)
    assert msg.startswith(f"{p}:3: field 'id' 'x' repeats line 1 with a different answer")


# --------------------------------------------------------------------------- lengths


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(["Who leads Zorvex?", "Kalin Marr", "What is 14 plus 41?", "55"] * 30, d, vocab_size=200)
    return load_tokenizer(d)


def test_sequence_longer_than_max_seq_len(tmp_path, tok):
    """data.overlong=error refuses naming the file and the row id; truncate cuts the prompt's start."""
    row = {"id": "long", "question": "Who leads " + "Zorvex " * 40 + "?", "answer": "Kalin Marr"}
    short = {"question": "Who leads Zorvex?", "answer": "Kalin Marr"}
    train = write(tmp_path / "stage_01" / "train.jsonl", json.dumps(short) + "\n" + json.dumps(row) + "\n")
    write(tmp_path / "stage_01" / "test.jsonl", GOOD)
    msg = refused(DataError, check_lengths, load_world(tmp_path), tok, 64, "error")
    assert msg.startswith(f"{train} id=long: row 'long' is ") and "longer than data.max_seq_len=64" in msg
    ex = encode_example(tok, row, 64, "truncate", "f")
    assert len(ex.input_ids) == 64 and ex.input_ids[0] == tok.bos_token_id
    answer = [*answer_ids(tok, "Kalin Marr"), tok.eos_token_id]  # the toy template ends a turn with eos
    assert ex.labels[-len(answer) :] == answer


def test_max_seq_len_beyond_model_positions(tmp_path):
    model = write(tmp_path / "m" / "config.json", '{\n  "model_type": "llama",\n  "max_position_embeddings": 64\n}\n')
    check_model_dir(model.parent, 64)
    msg = refused(ModelError, check_model_dir, model.parent, 96)
    assert msg.startswith(f"{model}:3: max_position_embeddings is 64, shorter than data.max_seq_len=96")


# --------------------------------------------------------------------------- run config


def test_unknown_config_key(tmp_path):
    p = write(tmp_path / "run.yaml", "run:\n  seed: 1\ntrain:\n  lr: 0.1\n  lrr: 0.2\n")
    assert refused(ConfigError, load_config, p) == f"{p}:5: unknown key 'train.lrr' (did you mean 'train.lr'?)"


def test_wrong_config_type(tmp_path):
    p = write(tmp_path / "run.yaml", "train:\n  micro_batch_size: eight\n")
    assert refused(ConfigError, load_config, p) == f"{p}:2: train.micro_batch_size: expected int, got str 'eight'"


def test_missing_model_path(tmp_path):
    """model.path is checked where the tokenizer is loaded, which the recipe does before writing."""
    missing = tmp_path / "no_model"
    for fn in (load_tokenizer, check_model_dir):
        assert refused(ModelError, fn, missing) == f"model.path: {missing} does not exist " + (
            "(expected a Hugging Face model directory)"
        )


def test_deepspeed_config_contradicting_run_config(tmp_path):
    ds = write(
        tmp_path / "ds.json", '{\n  "zero_optimization": {"stage": 3},\n  "train_micro_batch_size_per_gpu": 4\n}'
    )
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"deepspeed.config={ds}", "train.micro_batch_size=8"])
    msg = refused(ConfigError, load_deepspeed_config, cfg, 2)
    assert msg.startswith(f"{ds}:3: 'train_micro_batch_size_per_gpu' is 4 but the run config")
    assert "train.micro_batch_size=8" in msg
    write(ds, '{\n  "bf16": {"enabled": true}\n}')
    msg = refused(ConfigError, load_deepspeed_config, cfg, 2)
    assert msg.startswith(f"{ds}:2: 'bf16.enabled' is True") and "model.dtype=fp32" in msg


def test_deepspeed_precision_contradicting_run_config(tmp_path):
    """A DeepSpeed file may not fix the accumulation or reduction dtype against the run config."""
    ds = write(tmp_path / "ds.json", '{\n  "communication_data_type": "bf16"\n}')
    bf16 = [f"deepspeed.config={ds}", "model.dtype=bf16"]
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", bf16)
    msg = refused(ConfigError, load_deepspeed_config, cfg, 2)
    assert msg.startswith(f"{ds}:2: 'communication_data_type' is 'bf16' but the run config")
    assert "deepspeed.communication_data_type=fp32" in msg
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [*bf16, "deepspeed.communication_data_type=model"])
    assert load_deepspeed_config(cfg, 2)["communication_data_type"] == "bf16"  # agrees: accepted
    write(ds, '{\n  "data_types": {\n    "grad_accum_dtype": "bfloat16"\n  }\n}')
    msg = refused(ConfigError, load_deepspeed_config, load_config(CONFIG_DIR / "run_cpu_default.yaml", bf16), 2)
    assert msg.startswith(f"{ds}:3: 'data_types.grad_accum_dtype' is 'bfloat16'") and "fp32" in msg


def test_world_size_not_dividing_the_batch(tmp_path):
    ds = write(tmp_path / "ds.json", '{\n  "train_batch_size": 32\n}')
    cfg = load_config(CONFIG_DIR / "run_cpu_default.yaml", [f"deepspeed.config={ds}", "train.micro_batch_size=8"])
    assert load_deepspeed_config(cfg, 4)["train_batch_size"] == 32  # 8 x 1 x 4
    msg = refused(ConfigError, load_deepspeed_config, cfg, 3)
    assert msg.startswith(f"{ds}:2: 'train_batch_size' is 32, which world size 3 does not divide")
    assert "train.micro_batch_size=8" in msg
    msg = refused(ConfigError, load_deepspeed_config, cfg, 2)  # divides, but needs 2 accumulation steps
    assert msg.startswith(f"{ds}:2: 'train_batch_size' is 32 but") and "set train.grad_accum=2" in msg


# --------------------------------------------------------------------------- a whole run


def test_run_failing_validation_writes_nothing(tmp_path):
    """launch/train.py (one process, no launcher) on a broken world: non-zero exit, the file and
    line on stderr, and no output directory."""
    write(tmp_path / "world" / "stage_00" / "train.jsonl", GOOD)
    write(tmp_path / "world" / "stage_00" / "test.jsonl", GOOD)
    bad = write(tmp_path / "world" / "stage_01" / "train.jsonl", GOOD + '{"question": "Where is Acme?"}\n')
    write(tmp_path / "world" / "stage_01" / "test.jsonl", GOOD)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        str(TINY_CONFIG),
        f"data.dir={tmp_path / 'world'}",
        f"run.output_dir={out}",
        f"model.path={tmp_path / 'no_model'}",
    ]
    proc = run(cmd, timeout=300, check=False)
    assert proc.returncode != 0
    assert f"{bad}:2: field 'answer' is missing" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_model_without_chat_template_refused_before_training(tmp_path, tok):
    """model.path at a tokenizer without a chat template: every rank refuses at setup, naming the
    missing template and model.chat_template, before anything is written or trained."""
    for split in ("train", "test"):
        for stage in ("stage_00", "stage_01"):
            write(tmp_path / "world" / stage / f"{split}.jsonl", GOOD)
    model = tmp_path / "bare_model"
    tok.save_pretrained(str(model))
    for f in model.glob("chat_template*"):
        f.unlink()
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    write(model / "config.json", '{"model_type": "llama", "max_position_embeddings": 128}')
    out = tmp_path / "out"
    args = [str(TINY_CONFIG), f"data.dir={tmp_path / 'world'}", f"run.output_dir={out}", f"model.path={model}"]
    proc = run(deepspeed_cmd("launch/train.py", *args), timeout=300, check=False)
    assert proc.returncode != 0
    # each rank refuses on its own, but the DeepSpeed launcher kills the other rank as soon as the
    # first exits non-zero: under load the slower rank may die before it prints (seen on 2 busy cores)
    assert 1 <= proc.stderr.count(f"msl_ds: error: model.path: the tokenizer in {model} has no chat template") <= 2
    assert "Set model.chat_template to a Jinja template" in proc.stderr
    assert not out.exists()
