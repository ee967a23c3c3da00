"""The benchmarks run end to end at toy size and write what they promise. Never asserts a timing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import encode, flops, train  # noqa: E402

TOY = ["--threads", "1", "--matmul-size", "256", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return ["--cache-dir", str(root / "cache"), "--results-dir", str(root / "results")]


def test_text_flops_match_a_hand_count():
    # One layer, width 4, 2 heads of width 2, 1 KV head, MLP 8, a 3-token sequence:
    # q and o 2*3*4*4 each, k and v 2*3*4*2 each, attention 2*(2*2)*3*4, SwiGLU 6*3*4*8.
    config = {"hidden_size": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 8,
              "num_hidden_layers": 1}
    assert flops.text_flops(config, [3]) == 96 + 96 + 48 + 48 + 96 + 576


def test_vision_flops_match_a_hand_count():
    # Width 4, MLP 8, one block, 2x2 merge, 2x2 single-channel single-frame patches, one 2x2-patch image:
    # patch embedding 2*4*4*4, block 2*4*4*16 + 2*4*2*4*8 + 4*4*4*4, merger 2*1*(16*16 + 16*6).
    config = {"embed_dim": 4, "mlp_ratio": 2, "depth": 1, "spatial_merge_size": 2, "patch_size": 2,
              "temporal_patch_size": 1, "in_channels": 1}
    assert flops.vision_flops(config, 6, [(1, 2, 2)]) == 128 + (512 + 512 + 256) + 704


def test_flop_count_matches_torch_flop_counter_on_a_real_forward(tiny_base):
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoProcessor, Qwen2VLModel

    processor = AutoProcessor.from_pretrained(tiny_base)
    model = Qwen2VLModel.from_pretrained(tiny_base, attn_implementation="eager").eval()
    images = [Image.new("RGB", (300, 200), (10, 200, 30)), Image.new("RGB", (100, 180), (200, 10, 30))]
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": "xin chào"}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, return_dict=True, return_tensors="pt"
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, use_cache=False)
    length = int(inputs["attention_mask"].sum())
    counted = flops.forward_flops(model.config, lengths=[length], image_grid_thw=inputs["image_grid_thw"].tolist())
    # Eager attention computes the full L x L score matrix; the formula counts its causal half as useful.
    text = model.config.text_config
    causal = 2 * text.hidden_size * length * (length + 1) * text.num_hidden_layers
    full = 4 * text.hidden_size * length * length * text.num_hidden_layers
    assert counted["total"] - causal + full == counter.get_total_flops()


def test_machine_record_tells_cpu_generations_and_features_apart():
    from benchmarks import common

    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx_vnni\n\nprocessor\t: 1\nmodel name\t: other\n"
    )
    identity = common.cpu_identity(cpuinfo)
    assert identity == {"cpu": "AMD EPYC", "cpu_family": 26, "cpu_model": 2, "cpu_features": ["avx2", "avx512f",
                                                                                              "avx512_bf16"]}
    machine = {**identity, "cpu_count": 2, "torch_threads": 1, "gpu": None}
    assert common.describe_machine(machine) == (
        "AMD EPYC (family 26 model 2; avx2, avx512f, avx512_bf16), 2 cores, 1 torch threads"
    )
    assert common.describe_machine({"cpu": "arm64", "cpu_count": 8, "torch_threads": 8, "gpu": None}) == (
        "arm64, 8 cores, 8 torch threads"
    )
    assert common.describe_machine({**machine, "gpu": "NVIDIA H100"}) == "NVIDIA H100"
    assert {"cpu", "cpu_count", "torch_threads"} <= common.machine_info("cpu").keys()


def test_encode_benchmark_at_toy_size(bench_dirs):
    result = encode.run(["--preset", "tiny", "--items", "6", "--warmup-items", "2", "--memory", "inprocess",
                         *TOY, *bench_dirs])
    assert set(result["systems"]) == {"st-viomni", "stock-st", "hf-loop"}
    assert result["agreement"]["ok"], result["agreement"]
    for name, system in result["systems"].items():
        assert system["vs_st-viomni"]["max_abs_diff"] < 1e-4, name
        assert system["items_per_s"]["median"] > 0
        assert system["tokens"]["visual"] > 0 and system["tokens"]["text"] > 0
        assert 0 <= system["padding_fraction"] < 1
        assert system["useful_flops"]["total"] > 0 and system["fraction_of_fp32_matmul"] > 0
        assert system["peak_memory"]["method"]
        assert system["minor_page_faults_per_pass"] >= 0
    # The same items go through every system, so every system embeds the same useful tokens.
    assert len({json.dumps(system["tokens"]["useful"]) for system in result["systems"].values()}) == 1
    assert result["systems"]["hf-loop"]["padding_fraction"] == 0
    # The reference is the faster of the two kernels timed (torch.mm and oneDNN's inner product).
    reference = result["matmul"]["float32"]
    assert reference["kernels"].keys() == {"torch.mm", "onednn"}
    assert reference["median"] == max(kernel["median"] for kernel in reference["kernels"].values()) > 0
    assert reference["kernels"][reference["kernel"]]["median"] == reference["median"]
    assert result["ratios"]["st_viomni_vs_stock_st_items_per_s"]["median"] > 0
    assert result["corpus"]["images_as_pil"] and result["corpus"]["images_as_path"]
    files = {kind: REPO_ROOT / path for kind, path in result["files"].items()}  # absolute paths stay absolute
    assert all(path.is_file() for path in files.values()), files
    assert json.loads(files["json"].read_text())["benchmark"] == "encode"


def test_train_benchmark_at_toy_size(bench_dirs):
    result = train.run(["--run", "tiny:8,16", "--no-plot", *TOY, *bench_dirs])
    sizes = result["presets"]["tiny"]["batch_sizes"]
    assert set(sizes) == {"8", "16"}
    for per_loss in sizes.values():
        assert set(per_loss) == {"prefix-routed", "cached-prefix-routed", "mnrl", "cached-mnrl"}
        for entry in per_loss.values():
            assert entry["step_seconds"]["median"] > 0
            assert entry["peak_memory"]["peak_growth_mib"] >= 0
            assert 0 <= entry["padding_fraction"] < 1
    # The cached losses compute the same loss values as their plain counterparts on the same batch.
    assert result["cached_matches_plain"]["ok"], result["cached_matches_plain"]
    assert "tiny/cached_prefix_routed_peak_memory_16_vs_8" in result["ratios"]
    assert "tiny/16/cached_prefix_routed_vs_cached_mnrl_step_time" in result["ratios"]


def test_peak_tensor_growth_counts_the_tensors_alive_at_the_peak():
    import torch

    from benchmarks import common

    def two_buffers_then_one():
        first = torch.ones(1_000_000)  # 4,000,000 bytes
        second = torch.ones(500_000)  # 2,000,000 bytes, alive together with the first
        del first, second
        return torch.ones(250_000).sum()

    peak = common.peak_tensor_growth_bytes(two_buffers_then_one)
    assert 6_000_000 <= peak < 6_100_000, peak


def test_train_benchmark_reports_the_peak_of_live_tensors(bench_dirs):
    result = train.run(["--run", "tiny:4,8", "--losses", "cached-prefix-routed", "--tensor-peak", "--no-plot",
                        *TOY, *bench_dirs])
    for per_loss in result["presets"]["tiny"]["batch_sizes"].values():
        assert per_loss["cached-prefix-routed"]["peak_tensor_growth_mib"] > 0
    assert result["ratios"]["tiny/cached_prefix_routed_peak_tensors_8_vs_4"] > 0
    assert "| peak tensor growth |" in train.markdown_table(result)
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda", "--tensor-peak"])
