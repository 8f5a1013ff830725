"""Stage shards chained in one process against transformers, per family and split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.model.arch import LINEAR_NAMES, arch_from_config, layer_prefix, read_config
from runtime.model.blocks import FusedLinear
from runtime.model.checkpoint import Checkpoint
from runtime.model.local_chain import LocalChain
from runtime.model.shard import FUSED_LINEARS, StageSpec, load_shard
from runtime.quant import quantize_linear
from tests.runtime.model.checkpoints import save_checkpoint, tiny_configs

SPLITS = {1: [(0, 4)], 2: [(0, 1), (1, 4)], 3: [(0, 1), (1, 3), (3, 4)]}
MAX_NEW = 6


def prompts(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths."""
    gen = torch.Generator().manual_seed(1)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, longest - n :] = 1
    return ids, mask


def shards_for(
    directory: Path,
    ranges: list[tuple[int, int]],
    bits: int = 16,
    batch: int = 3,
    max_len: int = 32,
    impl: str = "auto",
) -> LocalChain:
    arch = arch_from_config(read_config(directory), str(directory))
    shards = [
        load_shard(
            directory,
            arch,
            StageSpec(
                layer_range=r,
                layer_bits=(bits,) * (r[1] - r[0]),
                holds_embedding=k == 0,
                holds_lm_head=k == len(ranges) - 1,
                group_size=32,
                batch_slots=batch,
                max_len=max_len,
            ),
            impl=impl,
        )  # type: ignore[arg-type]
        for k, r in enumerate(ranges)
    ]
    return LocalChain(shards)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: save_checkpoint(cfg, root / name) for name, cfg in tiny_configs().items()}


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("family", list(tiny_configs()))
def test_chain_matches_transformers_generate(
    checkpoints: dict[str, Path], family: str, stages: int
) -> None:
    directory = checkpoints[family]
    chain = shards_for(directory, SPLITS[stages], impl="reference")  # 16 bits in fp32
    _assert_greedy_matches_transformers(directory, chain, [9, 5, 12], prefill=1, decode=3)


def _assert_greedy_matches_transformers(
    directory: Path, chain: LocalChain, lengths: list[int], prefill: int, decode: int
) -> None:
    """The chain's greedy tokens equal transformers' ``generate`` on left-padded prompts of these
    lengths, and its logits agree at every step."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids, mask = prompts(model.config.vocab_size, lengths)
    ref = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    ours = chain.greedy(ids, mask, MAX_NEW, prefill_size=prefill, decode_size=decode)
    assert torch.equal(ours.tokens, ref.sequences[:, ids.shape[1] :])
    for step, (mine, theirs) in enumerate(zip(ours.logits, ref.logits, strict=True)):
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-4, atol=1e-4, msg=f"step {step}")


def _layer_weights(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each linear operator's weight as a decoder layer multiplies by it, by short name (the
    parts of a fused layer split out)."""
    modules = {**dict(layer.mlp.items()), "o": layer.attn.o_proj}
    if layer.attn.qkv is None:
        modules |= {"q": layer.attn.q_proj, "k": layer.attn.k_proj, "v": layer.attn.v_proj}
    else:
        modules["qkv"] = layer.attn.qkv
    weights = {}
    for name, module in modules.items():
        if isinstance(module, FusedLinear):
            weights |= dict(zip(FUSED_LINEARS[name], module.dequantized_weights(), strict=True))
        else:
            weights[name] = module.dequantized_weight()
    return weights


@pytest.mark.parametrize("bits", [16, 8, 4, 3])
def test_a_cpu_stage_builds_operators_of_one_input_as_one_layer_with_their_outputs(
    checkpoints: dict[str, Path], bits: int
) -> None:
    directory = checkpoints["llama"]
    layer = shards_for(directory, [(0, 4)], bits=bits).shards[0].layers[1]
    fused = {"qkv": layer.attn.qkv, "gate_up": layer.mlp["gate_up"]}
    assert not hasattr(layer.attn, "q_proj") and "gate" not in layer.mlp
    checkpoint = Checkpoint(directory)
    prefix = layer_prefix(arch_from_config(read_config(directory), str(directory)), 1)
    gen = torch.Generator().manual_seed(2)
    for name, parts in FUSED_LINEARS.items():
        module = fused[name]
        assert isinstance(module, FusedLinear)
        separate = [
            quantize_linear(
                checkpoint.read(f"{prefix}{LINEAR_NAMES['llama'][p]}.weight"),
                None,
                bits,
                32,
                compute_dtype=torch.float32,
                device="cpu",
            )
            for p in parts
        ]
        for rows in (1, 8, 40):  # native decode rows, several, a prefill's block
            x = torch.randn(rows, separate[0].in_features, generator=gen)
            outputs = module(x)
            assert len(outputs) == len(parts)
            for got, alone in zip(outputs, separate, strict=True):
                assert torch.equal(got, alone(x))


def _dequantized_reference(directory: Path, chain: LocalChain) -> torch.nn.Module:
    """The transformers model with every linear weight replaced by what the shards multiply
    by (their dequantized weights)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    named = dict(model.named_modules())
    for shard in chain.shards:
        for layer in shard.layers:
            prefix = layer_prefix(shard.arch, layer.index)
            for short, weight in _layer_weights(layer).items():
                target = named[prefix + LINEAR_NAMES[shard.arch.family][short]]
                target.weight.data = weight.float()
    return model


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_low_bit_chain_matches_the_dequantized_reference(
    checkpoints: dict[str, Path], family: str, impl: str
) -> None:
    directory = checkpoints[family]
    ranges = SPLITS[3]
    arch = arch_from_config(read_config(directory), str(directory))
    bits = [(8,), (3, 2), (4,)]  # per stage, per layer: every low precision appears
    shards = [
        load_shard(
            directory,
            arch,
            StageSpec(
                layer_range=r,
                layer_bits=b,
                holds_embedding=k == 0,
                holds_lm_head=k == 2,
                group_size=32,
                batch_slots=3,
                max_len=32,
            ),
            impl=impl,
        )  # type: ignore[arg-type]
        for k, (r, b) in enumerate(zip(ranges, bits, strict=True))
    ]
    chain = LocalChain(shards)
    model = _dequantized_reference(directory, chain)
    ids, mask = prompts(arch.vocab_size, [9, 5, 12])
    ours = chain.greedy(ids, mask, 1, prefill_size=3, decode_size=3).logits[0]
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask).logits[:, -1].float()
    tolerance = 1e-4 if impl == "reference" else 1.5e-1  # bf16 activations in the int kernels
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("family", list(tiny_configs()))
def test_decode_without_padding_attends_without_a_mask_and_matches_transformers(
    checkpoints: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of one length leave no padding: each decode step's context carries no mask (the
    same bits from attention, less work), and the tokens and logits stay transformers'."""
    from runtime.model.shard import StageShard

    directory = checkpoints[family]
    seen: list[tuple[int, bool]] = []  # (new tokens, whether the context has a mask)
    context = StageShard.context

    def recorded(self: StageShard, *args: object) -> object:
        ctx = context(self, *args)  # type: ignore[arg-type]
        seen.append((ctx.positions.shape[1], ctx.mask is not None))
        return ctx

    monkeypatch.setattr(StageShard, "context", recorded)
    chain = shards_for(directory, SPLITS[2], batch=2, impl="reference")
    _assert_greedy_matches_transformers(directory, chain, [7, 7], prefill=2, decode=2)
    arch = arch_from_config(read_config(directory), str(directory))
    # ALiBi keeps its biases; a sliding window shorter than the context hides keys
    masked_decode = arch.alibi or bool(arch.sliding_window and arch.sliding_window < 7)
    assert {masked for tokens, masked in seen if tokens == 7} == {True}  # prefill: causal
    assert {masked for tokens, masked in seen if tokens == 1} == {masked_decode}


@pytest.mark.parametrize("family", list(tiny_configs()))
def test_a_host_stage_rotates_into_the_cache_in_one_call_with_the_same_bits(
    checkpoints: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host with the native kernels, a rotary family's layers rotate queries and keys and
    write the cache in one native call, prefill and decode; greedy tokens and every logit are the
    bits the torch operations give (the fused step switched off for the comparison)."""
    from runtime.model import blocks
    from runtime.quant import native

    if native.kernels() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    directory = checkpoints[family]
    fused = blocks._rope_into_cache
    calls: list[int] = []  # new tokens of each fused step

    def counted(q: torch.Tensor, *args: object) -> object:
        out = fused(q, *args)  # type: ignore[arg-type]
        if out is not None:
            calls.append(q.shape[1])
        return out

    runs = []
    for rotate in (counted, lambda *args: None):
        monkeypatch.setattr(blocks, "_rope_into_cache", rotate)
        chain = shards_for(directory, SPLITS[2], batch=3)
        ids, mask = prompts(chain.shards[0].arch.vocab_size, [9, 5, 12])
        runs.append(chain.greedy(ids, mask, MAX_NEW, prefill_size=2, decode_size=3))
    arch = arch_from_config(read_config(directory), str(directory))
    assert bool(calls) == (arch.family == "llama")  # rotary families only
    if calls:
        assert {1, 12} <= set(calls)  # decode steps and the prefill
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for mine, theirs in zip(runs[0].logits, runs[1].logits, strict=True):
        assert torch.equal(mine, theirs)
