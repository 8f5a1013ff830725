"""Tests of planner/model_spec.py: loading shapes from Hugging Face configs.

The tiny-model tests check the planner's parameter formulas against real ``transformers``
modules; they may import torch and transformers (only ``planner/`` may not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from planner.errors import ModelConfigError
from planner.model_spec import (
    EXAMPLES_DIR,
    ModelSpec,
    example_model_names,
    load_model_spec,
    model_spec_from_config,
    total_params,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "models"

# name: (family, layers, hidden, ffn, heads, kv heads, vocab, max positions, tied)
EXAMPLE_SHAPES: dict[str, tuple[str, int, int, int, int, int, int, int, bool]] = {
    "opt-13b": ("opt", 40, 5120, 20480, 40, 40, 50272, 2048, True),
    "opt-30b": ("opt", 48, 7168, 28672, 56, 56, 50272, 2048, True),
    "opt-66b": ("opt", 64, 9216, 36864, 72, 72, 50272, 2048, True),
    "bloom-176b": ("bloom", 70, 14336, 57344, 112, 112, 250880, 2048, True),
    "llama-3.1-8b": ("llama", 32, 4096, 14336, 32, 8, 128256, 131072, False),
    "llama-3.1-70b": ("llama", 80, 8192, 28672, 64, 8, 128256, 131072, False),
    "qwen2.5-7b": ("llama", 28, 3584, 18944, 28, 4, 152064, 131072, False),
    "qwen2.5-32b": ("llama", 64, 5120, 27648, 40, 8, 152064, 131072, False),
    "mistral-7b-v0.1": ("llama", 32, 4096, 14336, 32, 8, 32000, 32768, False),
}

# Published parameter counts (model cards / papers), billions.
PUBLISHED_BILLIONS = {
    "opt-13b": 13.0,
    "opt-30b": 30.0,
    "opt-66b": 66.0,
    "bloom-176b": 176.247,
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.6,
    "qwen2.5-7b": 7.61,
    "qwen2.5-32b": 32.5,
    "mistral-7b-v0.1": 7.24,
}


# --------------------------------------------------------------------------- bundled examples


def test_every_example_is_listed() -> None:
    assert example_model_names() == tuple(sorted(EXAMPLE_SHAPES))


@pytest.mark.parametrize("name", sorted(EXAMPLE_SHAPES))
def test_example_loads_with_expected_shape(name: str) -> None:
    spec = load_model_spec(name)
    family, layers, hidden, ffn, heads, kv_heads, vocab, max_pos, tied = EXAMPLE_SHAPES[name]
    assert spec.source == name
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.intermediate_size) == (
        family,
        layers,
        hidden,
        ffn,
    )
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (heads, kv_heads, 128)
    assert (spec.vocab_size, spec.max_positions, spec.tied_embeddings) == (vocab, max_pos, tied)


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_example_parameter_total_matches_published_size(name: str) -> None:
    total_billions = total_params(load_model_spec(name)) / 1e9
    assert total_billions == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.03)


def test_example_readme_table_matches_computed_totals() -> None:
    readme = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    for name in EXAMPLE_SHAPES:
        row = next(line for line in readme.splitlines() if line.startswith(f"| {name} "))
        assert f"| {total_params(load_model_spec(name)):,} |" in row


def test_family_specifics_of_examples() -> None:
    opt, bloom = load_model_spec("opt-30b"), load_model_spec("bloom-176b")
    qwen, llama = load_model_spec("qwen2.5-7b"), load_model_spec("llama-3.1-8b")
    assert opt.position_table_rows == 2050 and opt.norm_bias and opt.mlp_bias
    assert bloom.position_table_rows == 0 and bloom.attention_bias
    assert (qwen.attention_bias, qwen.output_bias, qwen.mlp_bias) == (True, False, False)
    assert (llama.attention_bias, llama.output_bias, llama.norm_bias) == (False, False, False)


# --------------------------------------------------------------------------- ways to name a model


def test_directory_config_file_and_example_name_give_the_same_shape(tmp_path: Path) -> None:
    config = EXAMPLES_DIR / "opt-13b" / "config.json"
    (tmp_path / "config.json").write_text(config.read_text(encoding="utf-8"), encoding="utf-8")
    from_dir = load_model_spec(tmp_path)
    from_file = load_model_spec(str(config))
    from_name = load_model_spec("opt-13b")
    assert from_dir.source == str(tmp_path)
    assert from_file.source == str(config)
    assert from_dir.to_ref().num_layers == from_file.num_layers == from_name.num_layers == 40


def test_model_spec_from_config_keeps_source() -> None:
    config = {
        "model_type": "gpt2",
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_inner": None,
        "vocab_size": 100,
        "n_positions": 32,
    }
    spec = model_spec_from_config(config, "my-gpt")
    assert spec.source == "my-gpt"
    assert spec.intermediate_size == 256 and spec.position_table_rows == 32


def test_explicit_head_dim_need_not_divide_hidden() -> None:
    config = json.loads((DATA / "heads-not-dividing-hidden" / "config.json").read_text())
    spec = model_spec_from_config({**config, "head_dim": 16}, "x")
    assert spec.head_dim == 16 and spec.num_heads == 6


def test_unreachable_hub_id_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    constants = pytest.importorskip("huggingface_hub.constants")
    # The variable is read when huggingface_hub is first imported; it may be imported already.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelConfigError) as info:
        load_model_spec("no-such-org/no-such-model")
    assert info.value.msg.startswith(
        "no-such-org/no-such-model: not a local path, and could not fetch its config.json "
        "from the Hugging Face hub ("
    )
    assert info.value.msg.endswith(
        "); no hub may be reachable from here: pass a local checkpoint directory or "
        "config.json instead"
    )


def test_hub_id_without_huggingface_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ModelConfigError) as info:
        load_model_spec("org/name")
    assert info.value.msg == (
        "org/name: not a local path, and could not fetch its config.json from the Hugging Face "
        "hub (huggingface_hub is not installed); no hub may be reachable from here: pass a local "
        "checkpoint directory or config.json instead"
    )


def test_loading_imports_no_heavy_library() -> None:
    code = (
        "import sys; from planner.model_spec import load_model_spec; "
        "load_model_spec('llama-3.1-8b'); "
        "bad = {'torch', 'transformers', 'huggingface_hub'} & set(sys.modules); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --------------------------------------------------------------------------- bad configs

NOT_FOUND_ADVICE = (
    "no config.json here; give a checkpoint directory, a config.json, a hub id (org/name) "
    "or the name of an example under examples/models"
)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError) as info:
        load_model_spec(tmp_path)
    assert info.value.msg == f"{tmp_path}: {NOT_FOUND_ADVICE}"


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ModelConfigError) as info:
        load_model_spec(str(missing))
    assert info.value.msg == f"{missing}: {NOT_FOUND_ADVICE}"


BAD_CONFIGS = {
    "invalid-json": "not valid JSON: Expecting ',' delimiter: line 3 column 3 (char 28)",
    "not-an-object": "expected a JSON object, got list",
    "no-model-type": 'missing field "model_type"; is this a Hugging Face config.json?',
    "missing-field": 'missing field "hidden_size" (needed for llama models)',
    "bloom-missing-layers": (
        'missing field "n_layer" (needed for bloom models; "num_hidden_layers" is also accepted)'
    ),
    "non-positive-size": 'field "num_hidden_layers" must be a positive integer, got 0',
    "non-integer-size": 'field "hidden_size" must be a positive integer, got 64.5',
    "string-size": 'field "vocab_size" must be a positive integer, got "100"',
    "bad-flag": 'field "tie_word_embeddings" must be true or false, got "yes"',
    "heads-not-dividing-hidden": "hidden size 64 is not divisible by 6 attention heads",
    "kv-heads-not-dividing-heads": "4 attention heads are not divisible by 3 key/value heads",
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_reported(name: str) -> None:
    path = DATA / name / "config.json"
    with pytest.raises(ModelConfigError) as info:
        load_model_spec(DATA / name)
    assert info.value.msg == f"{path}: {BAD_CONFIGS[name]}"
    assert info.value.title == "bad model config"


def test_unsupported_architecture_is_reported() -> None:
    path = DATA / "unsupported-architecture" / "config.json"
    with pytest.raises(ModelConfigError) as info:
        load_model_spec(path)
    assert info.value.msg == (
        f'unsupported architecture "mamba" in {path}; '
        "supported: bloom, gpt2, llama, mistral, opt, qwen2"
    )


def test_every_bad_fixture_is_tested() -> None:
    fixtures = {p.name for p in DATA.iterdir() if p.is_dir()}
    assert fixtures == set(BAD_CONFIGS) | {"unsupported-architecture"}


# --------------------------------------------------------------------------- against transformers


def _tiny_configs() -> dict[str, Any]:
    transformers = pytest.importorskip("transformers")
    llama = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 97,
        "max_position_embeddings": 64,
    }
    opt = {
        "hidden_size": 64,
        "ffn_dim": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 97,
        "max_position_embeddings": 64,
    }
    bloom = {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 97}
    gpt2 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 97, "n_positions": 64}
    return {
        "llama": transformers.LlamaConfig(**llama),
        "llama-biases-tied": transformers.LlamaConfig(
            **llama, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        ),
        "llama-head-dim": transformers.LlamaConfig(**llama, head_dim=24),
        "qwen2": transformers.Qwen2Config(**llama),
        "mistral": transformers.MistralConfig(**llama),
        "opt": transformers.OPTConfig(**opt),
        "opt-no-bias-untied": transformers.OPTConfig(
            **opt, enable_bias=False, tie_word_embeddings=False
        ),
        "opt-projected": transformers.OPTConfig(**opt, word_embed_proj_dim=32),
        "bloom": transformers.BloomConfig(**bloom),
        "gpt2": transformers.GPT2Config(**gpt2),
        "gpt2-inner": transformers.GPT2Config(**gpt2, n_inner=80),
    }


TINY = [
    "llama",
    "llama-biases-tied",
    "llama-head-dim",
    "qwen2",
    "mistral",
    "opt",
    "opt-no-bias-untied",
    "opt-projected",
    "bloom",
    "gpt2",
    "gpt2-inner",
]

# family: (first decoder layer, embedding-side modules, head-side modules), by parameter name
PARTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "llama": ("model.layers.0", ("model.embed_tokens",), ("model.norm", "lm_head")),
    "opt": (
        "model.decoder.layers.0",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    ),
    "bloom": (
        "transformer.h.0",
        ("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
        ("transformer.ln_f", "lm_head"),
    ),
    "gpt2": (
        "transformer.h.0",
        ("transformer.wte", "transformer.wpe"),
        ("transformer.ln_f", "lm_head"),
    ),
}


def _count(model: Any, prefixes: tuple[str, ...]) -> int:
    """Parameters under any of ``prefixes``, a tied tensor counted under each of its names."""
    return sum(
        p.numel()
        for name, p in model.named_parameters(remove_duplicate=False)
        if any(name.startswith(prefix + ".") for prefix in prefixes)
    )


def _per_layer(spec: ModelSpec) -> int:
    return spec.layer_weights + spec.layer_bias_params + spec.layer_norm_params


@pytest.mark.parametrize("name", TINY)
def test_parameter_counts_match_transformers(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = _tiny_configs()[name]
    config.save_pretrained(tmp_path)
    spec = load_model_spec(tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(config)

    layer, embedding, head = PARTS[spec.family]
    # BLOOM normalises the token embedding with a LayerNorm that ModelSpec does not count.
    embedding_gap = 2 * spec.hidden_size if spec.family == "bloom" else 0
    assert _per_layer(spec) == _count(model, (layer,))
    assert spec.embedding_params == _count(model, embedding) - embedding_gap
    assert spec.head_params == _count(model, head)

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert spec.tied_embeddings == tied
    assert total_params(spec) == sum(p.numel() for p in model.parameters()) - embedding_gap
