"""Host weights and KV caches in transparent huge pages: advised, aligned, shared where tied,
nothing extra resident, and the same numbers as in small pages."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from runtime.model import memory
from runtime.model import shard as shard_module
from runtime.model.arch import arch_from_config, read_config
from runtime.model.local_chain import LocalChain
from runtime.model.memory import HUGE_PAGE, huge_page_zeros, huge_pages_available
from runtime.model.shard import StageShard, StageSpec, load_shard
from runtime.quant.linear import DenseLinear
from tests.runtime.model.checkpoints import save_checkpoint

needs_huge_pages = pytest.mark.skipif(
    not huge_pages_available(), reason="no transparent huge pages (not Linux, or set to never)"
)


def mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    found: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # "start-end perms offset ..." opens a mapping
            if found is not None:
                break
            start, end = (int(v, 16) for v in head.split("-"))
            if start <= address < end:
                found = {"range": head}
        elif found is not None:
            key, _, value = line.partition(":")
            found[key] = value.strip()
    assert found is not None, f"no mapping holds {address:#x}"
    return found


def advised(tensor: torch.Tensor) -> bool:
    return "hg" in mapping_of(tensor.data_ptr())["VmFlags"].split()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """A Llama whose fused gate/up weight (3 MiB in bf16, 6 in fp32) and tables pass 2 MiB and
    whose o projection (0.5 or 1 MiB) does not; untied and tied."""
    base = {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 4096,
        "max_position_embeddings": 512,
    }
    return {
        tied: save_checkpoint(
            LlamaConfig(**base, tie_word_embeddings=tied),
            tmp_path_factory.mktemp(f"llama-{'tied' if tied else 'untied'}"),
        )
        for tied in (False, True)
    }


def load(checkpoint: Path) -> StageShard:
    arch = arch_from_config(read_config(checkpoint), str(checkpoint))
    spec = StageSpec((0, 2), (16, 16), True, True, 128, batch_slots=4, max_len=512)
    return load_shard(checkpoint, arch, spec, dtype=torch.float32)


@needs_huge_pages
def test_weights_past_a_huge_page_are_advised_and_aligned(checkpoints: dict[bool, Path]) -> None:
    shard = load(checkpoints[False])
    for layer in shard.layers:
        weights = [m.weight for m in layer.modules() if isinstance(m, DenseLinear)]
        assert len(weights) == 4  # q/k/v, o, gate/up, down
        for weight in weights:  # from a huge page on (gate/up always; o never): moved, aligned
            # when this fails, the message names the mapping and storage found (read only then)
            storage = weight.untyped_storage()
            held = f"{weight.nbytes} bytes at {weight.data_ptr():#x} (storage {storage.nbytes()})"
            assert advised(weight) is (weight.nbytes >= HUGE_PAGE), (
                held,
                mapping_of(weight.data_ptr()),
            )
            assert weight.data_ptr() % HUGE_PAGE == 0 or weight.nbytes < HUGE_PAGE
        assert layer.mlp["gate_up"].linear.weight.nbytes >= HUGE_PAGE
        assert layer.attn.o_proj.weight.nbytes < HUGE_PAGE
    assert shard.embedding is not None and shard.head is not None
    assert advised(shard.embedding.tokens) and advised(shard.head.weight)
    assert shard.embedding.tokens.data_ptr() != shard.head.weight.data_ptr()
    keys = shard.cache.keys[0]  # 4 slots × 8 heads × 512 positions × 64 × fp32 = 4 MiB
    assert keys.nbytes == 4 * 2**20 and advised(keys) and not keys.any()


@needs_huge_pages
def test_a_tied_table_and_head_keep_one_copy(checkpoints: dict[bool, Path]) -> None:
    shard = load(checkpoints[True])
    assert shard.embedding is not None and shard.head is not None
    assert shard.embedding.tokens.data_ptr() == shard.head.weight.data_ptr()
    assert advised(shard.head.weight)


@needs_huge_pages
def test_the_same_logits_as_in_small_pages(
    checkpoints: dict[bool, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    huge = LocalChain([load(checkpoints[False])]).greedy(ids, mask, 6, decode_size=1)
    monkeypatch.setattr(shard_module, "onto_huge_pages", lambda module: 0)
    small_shard = load(checkpoints[False])
    assert not advised(small_shard.embedding.tokens)  # type: ignore[union-attr]
    small = LocalChain([small_shard]).greedy(ids, mask, 6, decode_size=1)
    assert torch.equal(huge.tokens, small.tokens)
    for a, b in zip(huge.logits, small.logits, strict=True):
        assert torch.equal(a, b)


@needs_huge_pages
def test_only_the_tensors_bytes_become_resident() -> None:
    tensor = huge_page_zeros((HUGE_PAGE + 5000,), torch.uint8)  # one huge page and a bit
    assert tensor.data_ptr() % HUGE_PAGE == 0
    tensor.fill_(7)
    fields = mapping_of(tensor.data_ptr())
    resident_kib = int(fields["Rss"].split()[0])
    assert resident_kib <= (HUGE_PAGE + 8192) // 1024  # the huge page and two small ones
    assert int(fields["AnonHugePages"].split()[0]) in (0, HUGE_PAGE // 1024)  # 0: none free
    assert bool((tensor == 7).all())


def test_a_small_tensor_stays_a_plain_one() -> None:
    tensor = huge_page_zeros((3, 5), torch.float32)
    assert tensor.shape == (3, 5) and not tensor.any()
    assert tensor.untyped_storage().nbytes() == 60


@pytest.mark.parametrize(
    ("setting", "available"),
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
        (None, False),
    ],
)
def test_huge_pages_follow_the_kernels_setting(
    tmp_path: Path, setting: str | None, available: bool
) -> None:
    path = tmp_path / "enabled"
    if setting is not None:
        path.write_text(setting)
    expected = available and hasattr(mmap, "MADV_HUGEPAGE")
    assert memory.huge_pages_available.__wrapped__(path) is expected
