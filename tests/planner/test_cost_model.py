"""Tests of planner/cost_model.py: packed weight sizes, memory terms, roofline latencies, hops."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from planner import cost_model as cm
from planner.catalogue import CATALOGUE, cpu_device_type, gpu_device_type
from planner.cluster import GIB, ClusterSpec, DeviceSpec, DeviceType, HostSpec, LinkSpec
from planner.indicator import prior_indicator
from planner.model_spec import LinearOp, ModelSpec, load_model_spec
from planner.plan import Workload
from planner.problem import PlanningProblem, build_tables
from planner.profiles import LatencyProfile, LatencySample, shape_key

MIB = 2**20
T4 = CATALOGUE["T4"]  # fast kernels for 4, 8, 16 bits; 320 GB/s, 65 TFLOPS
P100 = CATALOGUE["P100-12G"]  # fast kernel only for 16 bits


def tiny_llama(tied: bool = True) -> ModelSpec:
    """hidden 64, 4 heads of 16, 2 KV heads (kv_width 32), gated FFN 128, vocab 1000."""
    return ModelSpec(
        source="test", family="llama", num_layers=4, hidden_size=64, intermediate_size=128,
        num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=1000, max_positions=2048,
        tied_embeddings=tied, gated_mlp=True, attention_bias=False, output_bias=False,
        mlp_bias=False, position_table_rows=0, embed_dim=64, norm_bias=False,
    )  # fmt: skip


def tiny_opt() -> ModelSpec:
    """OPT-shaped: hidden 64, FFN 256, biases everywhere, LayerNorm with bias."""
    return ModelSpec(
        source="test", family="opt", num_layers=2, hidden_size=64, intermediate_size=256,
        num_heads=4, num_kv_heads=4, head_dim=16, vocab_size=1000, max_positions=2048,
        tied_embeddings=True, gated_mlp=False, attention_bias=True, output_bias=True,
        mlp_bias=True, position_table_rows=2050, embed_dim=64, norm_bias=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- packed weights

SQUARE = LinearOp("o_proj", 4096, 4096, bias=False)
SQUARE_SCALES = 4096 * 32 * 2 * 2  # rows x groups x (scale + zero) x fp16


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (16, 33_554_432),
        (8, 16_777_216 + 4096 * 2),
        (4, 8_388_608 + SQUARE_SCALES),
        (3, 1536 * 4096 + SQUARE_SCALES),  # ceil(4096 * 3 / 8) = 1536 bytes per row
        (2, 4_194_304 + SQUARE_SCALES),
    ],
)
def test_packed_linear_bytes_square(bits: int, expected: int) -> None:
    assert cm.packed_linear_bytes(SQUARE, bits, group_size=128) == expected


RAGGED = LinearOp("fc", in_features=100, out_features=10, bias=True)  # 2 groups of 64 per row
RAGGED_SCALES = 10 * 2 * 2 * 2


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (16, 2000),
        (8, 1000 + 10 * 2),
        (4, 50 * 10 + RAGGED_SCALES),
        (3, 38 * 10 + RAGGED_SCALES),  # 300 bits = 37.5 bytes, rounded up per row
        (2, 25 * 10 + RAGGED_SCALES),
    ],
)
def test_packed_linear_bytes_partial_group(bits: int, expected: int) -> None:
    assert cm.packed_linear_bytes(RAGGED, bits, group_size=64) == expected


def test_three_bits_pack_eight_values_in_three_bytes() -> None:
    op = LinearOp("x", in_features=256, out_features=3, bias=False)
    scales = 3 * 1 * 2 * 2  # one group of 256 per row
    assert cm.packed_linear_bytes(op, 3, group_size=256) - scales == 3 * (256 // 8 * 3)


def test_smaller_groups_cost_more_scales() -> None:
    assert cm.packed_linear_bytes(SQUARE, 4, 64) - cm.packed_linear_bytes(SQUARE, 4, 128) == (
        SQUARE_SCALES
    )


def test_layer_weight_bytes_adds_biases_and_norms() -> None:
    opt = tiny_opt()
    # q, k, v, o: 64x64 each; fc1 64->256, fc2 256->64: 49152 weights, fp16.
    # Biases: 4 * 64 + 256 + 64 = 576; LayerNorms: 2 x (weight + bias) x 64 = 256.
    assert cm.layer_weight_bytes(opt, 16, 128) == 49152 * 2 + 2 * (576 + 256)
    llama = tiny_llama()
    # q 64x64, k/v 64x32, o 64x64, gate/up 64x128, down 128x64: 36864 weights; RMSNorms 2 x 64.
    assert cm.layer_weight_bytes(llama, 16, 128) == 36864 * 2 + 2 * 128
    linears_4 = sum(cm.packed_linear_bytes(op, 4, 128) for op in llama.layer_linears())
    assert cm.layer_weight_bytes(llama, 4, 128) == linears_4 + 2 * 128


# --------------------------------------------------------------------------- memory terms


def test_kv_cache_of_opt_30b_matches_the_spec() -> None:
    opt30 = load_model_spec("opt-30b")
    kv = cm.kv_cache_bytes_per_layer(opt30, global_batch=32, max_context=612, activation_bytes=2)
    assert kv == 2 * 32 * 612 * 7168 * 2
    assert kv == 535.5 * MIB


@pytest.mark.parametrize(
    ("name", "weights_mib", "kv_mib"), [("opt-13b", 600, 382.5), ("opt-30b", 1176, 535.5)]
)
def test_spec_worked_numbers_per_layer(name: str, weights_mib: float, kv_mib: float) -> None:
    model = load_model_spec(name)
    linears = sum(cm.packed_linear_bytes(op, 16, 128) for op in model.layer_linears())
    assert linears == weights_mib * MIB
    assert cm.kv_cache_bytes_per_layer(model, 32, 612, 2) == kv_mib * MIB


def test_kv_cache_uses_kv_heads_and_activation_width() -> None:
    llama = tiny_llama()  # kv_width 32, not 64
    assert cm.kv_cache_bytes_per_layer(llama, 4, 100, 2) == 2 * 4 * 100 * 32 * 2
    assert cm.kv_cache_bytes_per_layer(llama, 4, 100, 4) == 2 * 4 * 100 * 32 * 4


def test_layer_memory_is_weights_plus_kv() -> None:
    llama = tiny_llama()
    memory = cm.layer_memory_bytes(llama, T4, 8, 4, 100, 128)
    assert memory == cm.layer_weight_bytes(llama, 8, 128) + 2 * 4 * 100 * 32 * 2


def test_activation_peak_hand_computed() -> None:
    llama = tiny_llama()
    # per token: 4*64 (hidden) + 4*16 (q) + 2*32 (k, v) + 3*128 (gate, up, act) = 768
    prefill = 2 * 2 * 10 * (768 + 4 * 10)  # fp16, micro-batch 2, prompt 10, 4 score heads
    decode = 2 * 4 * (768 + 4 * 100)  # micro-batch 4, context 100
    assert cm.activation_peak_bytes(llama, T4, 2, 4, 10, 100) == max(prefill, decode) == 32320
    assert cm.activation_peak_bytes(llama, T4, 1, 8, 1, 1000) == 2 * 8 * (768 + 4 * 1000)


def test_embedding_head_tied_and_scratch_bytes() -> None:
    llama = tiny_llama(tied=True)
    assert cm.embedding_bytes(llama) == 2 * 1000 * 64
    assert cm.head_bytes(llama, micro_batch=4) == 2 * (64 + 1000 * 64) + 4 * 4 * 1000
    assert cm.tied_saving_bytes(llama) == 2 * 1000 * 64
    assert cm.tied_saving_bytes(tiny_llama(tied=False)) == 0
    assert cm.dequant_scratch_bytes(llama) == 2 * 64 * 128
    opt = tiny_opt()  # learned positions: 2050 rows of 64
    assert cm.embedding_bytes(opt) == 2 * (1000 * 64 + 2050 * 64)


# --------------------------------------------------------------------------- roofline


def test_operating_points() -> None:
    assert cm.prefill_point(4, 512) == cm.OperatingPoint("prefill", 4, 512, 512)
    assert cm.decode_point(8, 512, 101) == cm.OperatingPoint("decode", 8, 1, 512 + 50)


def test_linear_decode_is_the_memory_roofline() -> None:
    bandwidth = T4.memory_bandwidth_gb_s * 1e9 * cm.MEMORY_EFFICIENCY
    for bits in (16, 8, 4):  # fast kernels on a T4
        packed = cm.packed_linear_bytes(SQUARE, bits, 128)
        moved = packed + 1 * (4096 + 4096) * 2
        expected = moved / bandwidth + T4.launch_overhead_s
        assert cm.linear_latency_s(SQUARE, T4, bits, 1, 128) == pytest.approx(expected, rel=1e-12)


def test_linear_prefill_is_the_compute_roofline() -> None:
    tokens = 8 * 512
    flops = 2.0 * tokens * SQUARE.num_weights
    peak = T4.fp16_tflops * 1e12 * cm.MATMUL_EFFICIENCY
    expected_16 = flops / peak + T4.launch_overhead_s
    expected_4 = flops / (peak / cm.LOW_BIT_COMPUTE_PENALTY) + T4.launch_overhead_s
    assert cm.linear_latency_s(SQUARE, T4, 16, tokens, 128) == pytest.approx(expected_16, rel=1e-12)
    assert cm.linear_latency_s(SQUARE, T4, 4, tokens, 128) == pytest.approx(expected_4, rel=1e-12)


def test_linear_without_fast_kernel_pays_dequantization() -> None:
    bandwidth = P100.memory_bandwidth_gb_s * 1e9 * cm.MEMORY_EFFICIENCY
    packed = cm.packed_linear_bytes(SQUARE, 4, 128)
    dense = SQUARE.num_weights * 2
    dequant = SQUARE.num_weights / (P100.dequant_gelem_s * 1e9)
    unpack = (packed + dense) / bandwidth + P100.launch_overhead_s
    matmul = (dense + 8192 * 2) / bandwidth + P100.launch_overhead_s
    assert cm.linear_latency_s(SQUARE, P100, 4, 1, 128) == pytest.approx(
        dequant + unpack + matmul, rel=1e-12
    )


def test_decode_of_a_16_bit_layer_is_memory_bound() -> None:
    opt30 = load_model_spec("opt-30b")
    weights = sum(cm.packed_linear_bytes(op, 16, 128) for op in opt30.layer_linears())
    ideal = weights / (T4.memory_bandwidth_gb_s * 1e9 * cm.MEMORY_EFFICIENCY)
    latency = cm.layer_latency_s(opt30, T4, 16, cm.decode_point(1, 512, 64), 128)
    assert ideal < latency < 1.04 * ideal


def test_prefill_at_a_large_micro_batch_is_compute_bound() -> None:
    opt30 = load_model_spec("opt-30b")
    tokens = 8 * 512
    ideal = 2.0 * tokens * opt30.layer_weights / (T4.fp16_tflops * 1e12 * cm.MATMUL_EFFICIENCY)
    latency = cm.layer_latency_s(opt30, T4, 16, cm.prefill_point(8, 512), 128)
    weights_s = 2 * opt30.layer_weights / (T4.memory_bandwidth_gb_s * 1e9)
    assert ideal < latency < 1.1 * ideal
    assert latency > 20 * weights_s  # far above the time to stream the weights


def test_lower_bits_decode_faster_with_fast_kernels() -> None:
    opt30 = load_model_spec("opt-30b")
    point = cm.decode_point(1, 512, 64)
    t = {b: cm.layer_latency_s(opt30, T4, b, point, 128) for b in (16, 8, 4, 3, 2)}
    assert t[4] < t[8] < t[16]
    assert t[8] == pytest.approx(t[16] / 2, rel=0.1)  # half the bytes
    # 2 and 3 bits have no fast kernel on a T4: slower than 16 bits.
    assert t[3] > t[16]
    assert t[2] > t[16]


def test_lower_bits_decode_slower_without_fast_kernels() -> None:
    opt30 = load_model_spec("opt-30b")
    point = cm.decode_point(1, 512, 64)
    t = {b: cm.layer_latency_s(opt30, P100, b, point, 128) for b in (16, 8, 4, 3, 2)}
    for bits in (8, 4, 3, 2):
        assert t[bits] > t[16], bits


def test_unsupported_bits_give_inf() -> None:
    no_low_bits = dataclasses.replace(T4, supported_bits=frozenset({8, 16}))
    llama = tiny_llama()
    point = cm.decode_point(1, 64, 8)
    assert cm.layer_latency_s(llama, no_low_bits, 4, point, 128) == math.inf
    assert cm.layer_latency_s(llama, no_low_bits, 2, point, 128) == math.inf
    assert math.isfinite(cm.layer_latency_s(llama, no_low_bits, 8, point, 128))


@pytest.mark.parametrize("bits", [16, 8, 4, 3])
@pytest.mark.parametrize("device", [T4, P100], ids=["T4", "P100"])
def test_layer_latency_grows_with_micro_batch(bits: int, device: DeviceType) -> None:
    opt13 = load_model_spec("opt-13b")
    sizes = (1, 2, 4, 8, 16, 32)
    for points in (
        [cm.decode_point(b, 512, 64) for b in sizes],
        [cm.prefill_point(b, 256) for b in sizes],
    ):
        times = [cm.layer_latency_s(opt13, device, bits, point, 128) for point in points]
        assert all(a < b for a, b in itertools.pairwise(times)), times


@pytest.mark.parametrize("bits", [16, 4])
def test_layer_latency_grows_with_context(bits: int) -> None:
    opt13 = load_model_spec("opt-13b")
    decode = [
        cm.layer_latency_s(opt13, T4, bits, cm.decode_point(8, s, 64), 128)
        for s in (128, 256, 512, 1024)
    ]
    prefill = [
        cm.layer_latency_s(opt13, T4, bits, cm.prefill_point(4, s), 128)
        for s in (128, 256, 512, 1024)
    ]
    assert all(a < b for a, b in itertools.pairwise(decode)), decode
    assert all(a < b for a, b in itertools.pairwise(prefill)), prefill


# --------------------------------------------------------------------------- profile or roofline


def _profile(device_type: str, unavailable: tuple[int, ...] = ()) -> LatencyProfile:
    """16 and 4 bits measured (constant 1 ms and 0.5 ms plus a tiny slope); 8 prefill only."""
    samples = []
    for bits, base in ((16, 1e-3), (4, 5e-4), (8, 7e-4)):
        for b in (1, 2, 4, 8):
            for s in (128, 256, 512):
                samples.append(LatencySample("prefill", bits, b, s, base + 1e-6 * b * s))
            if bits != 8:
                for p in (129, 257, 513):
                    samples.append(LatencySample("decode", bits, b, p, base / 10 + 1e-8 * b * p))
    shape = shape_key(load_model_spec("opt-13b"))
    return LatencyProfile.from_samples(device_type, shape, samples, unavailable)


def test_layer_latency_uses_the_profile_when_it_covers_the_bits() -> None:
    opt13 = load_model_spec("opt-13b")
    profile = _profile("T4", unavailable=(3,))
    decode, prefill = cm.decode_point(4, 512, 64), cm.prefill_point(2, 300)
    for bits in (16, 4):
        assert cm.layer_latency_s(opt13, T4, bits, decode, 128, profile) == pytest.approx(
            profile.layer_latency_s(bits, "decode", 4, 544)
        )
        assert cm.layer_latency_s(opt13, T4, bits, prefill, 128, profile) == pytest.approx(
            profile.layer_latency_s(bits, "prefill", 2, 300)
        )
    assert cm.layer_latency_s(opt13, T4, 16, decode, 128, profile) == pytest.approx(
        1e-4 + 1e-8 * 4 * 544, rel=1e-6
    )
    # The profile differs from the roofline, so the equality above is not a coincidence.
    roofline = cm.layer_latency_s(opt13, T4, 16, decode, 128)
    assert abs(roofline - cm.layer_latency_s(opt13, T4, 16, decode, 128, profile)) > 1e-4


def test_layer_latency_falls_back_to_the_roofline() -> None:
    opt13 = load_model_spec("opt-13b")
    profile = _profile("T4")
    decode, prefill = cm.decode_point(4, 512, 64), cm.prefill_point(2, 300)
    # 8 bits: prefill measured, decode not; the profile does not cover it.
    assert not profile.covers(8)
    for point in (decode, prefill):
        assert cm.layer_latency_s(opt13, T4, 8, point, 128, profile) == cm.layer_latency_s(
            opt13, T4, 8, point, 128
        )
    # 2 bits: never measured.
    assert cm.layer_latency_s(opt13, T4, 2, decode, 128, profile) == cm.layer_latency_s(
        opt13, T4, 2, decode, 128, None
    )


def test_profile_marks_bits_unavailable_and_device_support_wins() -> None:
    opt13 = load_model_spec("opt-13b")
    decode = cm.decode_point(4, 512, 64)
    profile = _profile("T4", unavailable=(3,))
    assert cm.layer_latency_s(opt13, T4, 3, decode, 128, profile) == math.inf
    assert math.isfinite(cm.layer_latency_s(opt13, T4, 3, decode, 128))
    only_16 = dataclasses.replace(T4, supported_bits=frozenset({16}))
    assert cm.layer_latency_s(opt13, only_16, 4, decode, 128, profile) == math.inf


# --------------------------------------------------------------------------- communication


def test_hop_latency_is_latency_plus_bytes_over_bandwidth() -> None:
    link = LinkSpec(bandwidth_gb_s=12.5, latency_s=1e-4)
    llama = tiny_llama()
    decode = cm.decode_point(4, 64, 16)
    prefill = cm.prefill_point(2, 10)
    assert cm.hidden_transfer_bytes(llama, decode, 2) == 4 * 1 * 64 * 2
    assert cm.hidden_transfer_bytes(llama, prefill, 2) == 2 * 10 * 64 * 2
    assert cm.hop_latency_s(link, llama, decode, 2) == 1e-4 + 512 / 12.5e9
    assert cm.hop_latency_s(link, llama, prefill, 2) == 1e-4 + 2560 / 12.5e9
    assert cm.token_return_latency_s(link, 4) == 1e-4 + 4 * cm.TOKEN_ID_BYTES / 12.5e9


def test_gpu_device_type_feeds_the_roofline() -> None:
    slow = gpu_device_type("slow", 16, 100, 10)
    fast = gpu_device_type("fast", 16, 1000, 100)
    point = cm.decode_point(1, 512, 64)
    llama = tiny_llama()
    assert cm.layer_latency_s(llama, fast, 16, point, 128) < cm.layer_latency_s(
        llama, slow, 16, point, 128
    )


def test_default_group_size_divides_every_input_width() -> None:
    assert cm.default_group_size(load_model_spec("opt-30b")) == 128
    builtin = ModelSpec(
        source="t",
        family="llama",
        num_layers=2,
        hidden_size=192,
        intermediate_size=512,
        num_heads=6,
        num_kv_heads=3,
        head_dim=32,
        vocab_size=64,
        max_positions=64,
        tied_embeddings=True,
        gated_mlp=True,
        attention_bias=False,
        output_bias=False,
        mlp_bias=False,
        position_table_rows=0,
        embed_dim=192,
        norm_bias=False,
    )
    assert cm.default_group_size(builtin) == 64
    odd = dataclasses.replace(builtin, hidden_size=200, num_heads=5, head_dim=40, num_kv_heads=5)
    assert cm.default_group_size(odd) == 8  # no candidate divides 200: a power of two that does
    prime = dataclasses.replace(odd, hidden_size=199, num_heads=1, head_dim=199, num_kv_heads=1)
    assert cm.default_group_size(prime) == 1


def test_unquantized_weights_take_the_devices_compute_width() -> None:
    model = load_model_spec("opt-13b")
    cpu = cpu_device_type(
        cores=8, memory_bytes=64 * 1024**3, memory_bandwidth_gb_s=20, fp32_tflops=0.5
    )
    assert cpu.activation_bytes == 4
    gpu = CATALOGUE["V100-32G"]
    on_cpu = cm.layer_memory_bytes(model, cpu, 16, 1, 16, 128)
    on_gpu = cm.layer_memory_bytes(model, gpu, 16, 1, 16, 128)
    kv = cm.kv_cache_bytes_per_layer(model, 1, 16, 2)
    assert on_cpu - 2 * kv == 2 * (on_gpu - kv)
    # quantized weights keep their packed size; only biases and norms widen
    assert cm.layer_weight_bytes(model, 4, 128, 4) - cm.layer_weight_bytes(model, 4, 128, 2) == (
        2 * (model.layer_bias_params + model.layer_norm_params)
    )


def _cpu(native_bf16: bool) -> DeviceType:
    return cpu_device_type(
        cores=8, memory_bytes=64 * GIB, memory_bandwidth_gb_s=20, fp32_tflops=0.5,
        native_bf16=native_bf16,
    )  # fmt: skip


def test_a_bf16_cpu_counts_a_bf16_checkpoints_16_bit_weights_at_2_bytes_and_the_rest_at_4() -> None:
    # biases and LayerNorm biases: the compute-dtype part is non-zero
    model = dataclasses.replace(tiny_opt(), weight_dtype="bfloat16")
    bf16, fp32 = _cpu(native_bf16=True), _cpu(native_bf16=False)
    assert (bf16.activation_bytes, bf16.dense_weight_bytes) == (4, 2)
    assert (fp32.activation_bytes, fp32.dense_weight_bytes) == (4, 4)
    vectors = 4 * (model.layer_bias_params + model.layer_norm_params)
    kv = cm.kv_cache_bytes_per_layer(model, 2, 64, 4)
    on_bf16 = cm.layer_memory_bytes(model, bf16, 16, 2, 64, 64)
    assert on_bf16 == 2 * model.layer_weights + vectors + kv
    assert cm.layer_memory_bytes(model, fp32, 16, 2, 64, 64) == 4 * model.layer_weights + (
        vectors + kv
    )
    for bits in (8, 4, 3, 2):  # packed weights do not depend on the 16-bit width
        assert cm.layer_memory_bytes(model, bf16, bits, 2, 64, 64) == cm.layer_memory_bytes(
            model, fp32, bits, 2, 64, 64
        )


def test_16_bits_keeps_fp32_and_fp16_checkpoints_in_fp32_on_a_cpu_and_16_bit_on_a_gpu() -> None:
    bf16_cpu, fp32_cpu = _cpu(native_bf16=True), _cpu(native_bf16=False)
    gpu = T4
    for dtype in ("float32", "float16"):  # bf16 would round them; fp16 is not native on a CPU
        model = dataclasses.replace(tiny_opt(), weight_dtype=dtype)
        assert cm.weight16_bytes(model, bf16_cpu) == cm.weight16_bytes(model, fp32_cpu) == 4
        assert cm.weight16_bytes(model, gpu) == 2
        assert cm.layer_memory_bytes(model, bf16_cpu, 16, 2, 64, 64) == cm.layer_memory_bytes(
            model, fp32_cpu, 16, 2, 64, 64
        )
    bf16_model = dataclasses.replace(tiny_opt(), weight_dtype="bfloat16")
    assert cm.weight16_bytes(bf16_model, bf16_cpu) == 2
    assert cm.weight16_bytes(bf16_model, fp32_cpu) == 4


def test_a_bf16_cpu_moves_half_the_bytes_of_a_16_bit_linear() -> None:
    bf16, fp32 = _cpu(native_bf16=True), _cpu(native_bf16=False)
    bandwidth = bf16.memory_bandwidth_gb_s * 1e9 * cm.MEMORY_EFFICIENCY
    activations = (4096 + 4096) * 4
    for device, width in ((bf16, 2), (fp32, 4)):
        expected = (SQUARE.num_weights * width + activations) / bandwidth
        latency = cm.linear_latency_s(SQUARE, device, 16, 1, 128)
        assert latency == pytest.approx(expected + device.launch_overhead_s, rel=1e-12)


def test_a_bf16_cpu_dequantizes_into_bf16_scratch() -> None:
    model = tiny_llama()
    for native, width in ((True, 2), (False, 4)):
        device = DeviceSpec("box", -1, _cpu(native))
        problem = PlanningProblem(
            model=model,
            cluster=ClusterSpec("c", (HostSpec("box"),), (device,)),
            workload=Workload(2, 8, 4, 4),
            indicator=prior_indicator(model, 64),
            group_size=64,
        )
        tables = build_tables(problem, (device,), 1, 1)
        assert tables.dequant_scratch_bytes[0] == cm.dequant_scratch_bytes(model, width)
        # the ends stay in the compute dtype (fp32) either way
        assert tables.embedding_bytes[0] == cm.embedding_bytes(model, 4)
        assert tables.tied_saving_bytes[0] == cm.tied_saving_bytes(model, 4)


def test_device_type_dense_weight_bytes_defaults_to_the_activation_width() -> None:
    fp32_device = dataclasses.replace(T4, activation_bytes=4)  # replace keeps T4's 2
    assert fp32_device.dense_weight_bytes == 2
    fields = {f.name: getattr(T4, f.name) for f in dataclasses.fields(T4)}
    fields |= {"activation_bytes": 4, "dense_weight_bytes": 0}
    assert DeviceType(**fields).dense_weight_bytes == 4
    with pytest.raises(ValueError, match="dense_weight_bytes must be 2"):
        DeviceType(**(fields | {"dense_weight_bytes": 3}))
