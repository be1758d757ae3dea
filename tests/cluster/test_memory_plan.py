"""The memory planner: its estimates for the shipped PRM configs equal the hand computations below (from the models'
config.json numbers, written here), a config that does not fit is refused naming the setting that fits, and vLLM
engines are planned per tensor-parallel rank."""

from __future__ import annotations

import json
import math

import yaml
from typer.testing import CliRunner

from cluster.memory_plan import GB, RESERVED_FRACTION, engine_memory, param_counts, plan_config, train_memory
from configs.architectures import Architecture
from configs.schema import REPO_ROOT, load_config, parse_config
from prm_factory.cli import app

# config.json of each model on huggingface.co (Qwen/Qwen2.5-Math-1.5B-Instruct, Qwen/Qwen2.5-Math-7B-Instruct,
# Qwen/Qwen2.5-72B-Instruct; the base models share them), the numbers the planner reads.
QWEN25_MATH_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                    "max_position_embeddings": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
QWEN25_MATH_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                  "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN25_72B = {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
              "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
ARCH_1_5B = Architecture.from_config(QWEN25_MATH_1_5B, "test")
ARCH_7B = Architecture.from_config(QWEN25_MATH_7B, "test")
ARCH_72B = Architecture.from_config(QWEN25_72B, "test")


def _config(name: str):
    return load_config(REPO_ROOT / "configs" / name, check_paths=False)


def test_parameter_counts_match_the_published_sizes():
    """Qwen2.5's model cards: 1.54B parameters (1.31B non-embedding), 7.61B (6.53B), 72.7B (70.0B)."""
    for arch, total, non_embedding in ((ARCH_1_5B, 1.54e9, 1.31e9), (ARCH_7B, 7.61e9, 6.53e9),
                                       (ARCH_72B, 72.7e9, 70.0e9)):
        counts = param_counts(arch)
        all_params = counts.total(arch.num_layers, with_lm_head=True)
        assert abs(all_params - total) / total < 0.005
        assert abs(arch.num_layers * counts.layer - non_embedding) / non_embedding < 0.005


def test_the_7b_config_plan_equals_the_hand_computation():
    """configs/prm-qwen2.5-math-7b.yaml: fsdp over 8 workers, bf16-mixed, checkpointing, 4 x 4,096 tokens."""
    train = _config("prm-qwen2.5-math-7b.yaml").train
    assert (train.strategy, train.precision, train.activation_checkpointing) == ("fsdp", "bf16-mixed", True)
    assert train.batch_size * train.num_workers * train.grad_accum_steps == 64
    # One decoder layer: q, k, v, o projections (+ q/k/v biases), the SwiGLU MLP, two RMSNorms.
    layer = (3584 * 3584 + 2 * 3584 * 512 + 3584 * 3584 + 3 * 3584 * 18944) + (3584 + 2 * 512) + 2 * 3584
    embeddings = 152064 * 3584
    backbone = embeddings + 28 * layer + 3584  # AutoModel: no LM head
    heads = 8 * ((3584 * 128 + 128) + (128 * 128 + 128) + (128 * 1 + 1))
    params = backbone + heads
    per_token_layer = 2 * 3584 * 2 + (2 * 3584 + 2 * 3584 + 2 * 512 + 4 * 18944) * 2  # bf16 compute, r = c = 2
    expected = {
        "weights": math.ceil(params * 4 / 8),  # fp32 master weights, sharded over 8
        "gradients": math.ceil(params * 4 / 8),
        "optimizer": math.ceil(2 * params * 4 / 8),
        "gathered_weights": (embeddings + 3584 + 2 * layer) * 2,  # the root's and two layers' bf16 copies
        "gathered_gradients": layer * (2 + 4),  # one layer's bf16 gradient and its fp32 reduce copy
        # every layer's input kept, one layer recomputed, the embedding output and final hidden state
        "activations": 28 * 4 * 4096 * 3584 * 2 + 4 * 4096 * per_token_layer + 2 * 4 * 4096 * 3584 * 2,
    }
    plan = train_memory(ARCH_7B, train)
    assert plan.parts == expected
    assert plan.params == params == 7_070_619_136 + heads  # Qwen2.5-7B: 7,615,616,512 with its LM head
    assert 22 * 2**30 < plan.total < 23 * 2**30  # 22.6 GiB of the 72 GB usable on 80 GB GPUs


def test_the_1_5b_config_plan_equals_the_hand_computation():
    train = _config("prm-qwen2.5-math-1.5b.yaml").train
    assert (train.strategy, train.precision, train.activation_checkpointing) == ("fsdp", "bf16-mixed", True)
    assert train.batch_size * train.num_workers * train.grad_accum_steps == 64
    layer = (1536 * 1536 + 2 * 1536 * 256 + 1536 * 1536 + 3 * 1536 * 8960) + (1536 + 2 * 256) + 2 * 1536
    embeddings = 151936 * 1536  # tied: the LM head is the embedding matrix
    params = embeddings + 28 * layer + 1536 + 8 * ((1536 * 128 + 128) + (128 * 128 + 128) + (128 + 1))
    per_token_layer = 2 * 1536 * 2 + (2 * 1536 + 2 * 1536 + 2 * 256 + 4 * 8960) * 2
    expected = {
        "weights": math.ceil(params * 4 / 8),
        "gradients": math.ceil(params * 4 / 8),
        "optimizer": math.ceil(2 * params * 4 / 8),
        "gathered_weights": (embeddings + 1536 + 2 * layer) * 2,
        "gathered_gradients": layer * 6,
        "activations": 28 * 4 * 4096 * 1536 * 2 + 4 * 4096 * per_token_layer + 2 * 4 * 4096 * 1536 * 2,
    }
    assert train_memory(ARCH_1_5B, train).parts == expected


def test_ddp_with_autocast_keeps_a_full_copy_buckets_and_an_fp32_residual_stream():
    """The 1.5B config as DDP without checkpointing, ActPRM's 8 trajectories per GPU: what each GPU holds."""
    train = _config("prm-qwen2.5-math-1.5b.yaml").train.model_copy(
        update={"strategy": "ddp", "activation_checkpointing": False, "batch_size": 8, "grad_accum_steps": 1})
    layer = (1536 * 1536 + 2 * 1536 * 256 + 1536 * 1536 + 3 * 1536 * 8960) + (1536 + 2 * 256) + 2 * 1536
    layer_matmul = 1536 * 1536 + 2 * 1536 * 256 + 1536 * 1536 + 3 * 1536 * 8960
    params = 151936 * 1536 + 28 * layer + 1536 + 8 * ((1536 * 128 + 128) + (128 * 128 + 128) + (128 + 1))
    per_token_layer = 2 * 1536 * 4 + (2 * 1536 + 2 * 1536 + 2 * 256 + 4 * 8960) * 2  # norm inputs in fp32
    expected = {"weights": params * 4, "gradients": params * 4, "optimizer": 2 * params * 4,
                "ddp_buckets": params * 4, "autocast_copies": 2 * 28 * layer_matmul,
                "activations": 28 * 8 * 4096 * per_token_layer + 2 * 8 * 4096 * 1536 * 4}
    assert train_memory(ARCH_1_5B, train).parts == expected


def test_a_config_that_does_not_fit_is_refused_naming_the_setting_that_fits():
    raw = yaml.safe_load((REPO_ROOT / "configs" / "prm-qwen2.5-math-7b.yaml").read_text())
    raw["train"].update(strategy="ddp", activation_checkpointing=False)
    report = plan_config(parse_config(raw, check_paths=False), architectures={raw["train"]["model_path"]: ARCH_7B})
    assert not report.ok and report.train["fits"] is False
    [problem] = report.problems
    assert "does not fit" in problem and "strategy: ddp" in problem
    # DDP needs 16 bytes per parameter before activations (113 GB for 7B): only sharding fits, and with the
    # micro-batch of 4 kept, only with checkpointing too (fsdp alone fits with batch 2 x 2 accumulated: a smaller
    # micro-batch ranks after a kept one).
    shipped = train_memory(ARCH_7B, _config("prm-qwen2.5-math-7b.yaml").train).total  # fsdp + checkpointing
    assert problem.endswith(f"fits with strategy: fsdp and activation_checkpointing: true ({shipped / 2**30:.1f} GiB)")
    assert report.train["fits_with"] == "strategy: fsdp and activation_checkpointing: true"
    usable = int(80 * GB * (1 - RESERVED_FRACTION))
    assert report.train["usable"] == usable and report.train["total"] > usable


def test_validate_and_doctor_refuse_it_with_the_breakdown(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "configs" / "prm-qwen2.5-math-1.5b.yaml").read_text())
    raw["train"].update(strategy="ddp", activation_checkpointing=False, batch_size=8, grad_accum_steps=1)
    path = tmp_path / "too-big.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", "--no-check-paths", str(path)])
    assert result.exit_code == 2, result.output
    assert "activations" in result.output and "ddp_buckets" in result.output  # the breakdown
    assert "fits with activation_checkpointing: true" in result.output
    as_json = CliRunner().invoke(app, ["validate", "--no-check-paths", str(path), "--json"])
    report = json.loads(as_json.stdout)
    assert as_json.exit_code == 2 and report["ok"] is False
    assert report["memory"]["train"]["fits_with"] == "activation_checkpointing: true"
    doctor = CliRunner().invoke(app, ["doctor", str(path), "--json"])
    assert doctor.exit_code == 1
    memory_checks = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "memory"]
    assert [c["ok"] for c in memory_checks] == [False]
    assert "fits with activation_checkpointing: true" in memory_checks[0]["detail"]


def test_the_shipped_gpu_configs_fit_80_gb():
    for name in ("prm-qwen2.5-math-7b.yaml", "prm-qwen2.5-math-1.5b.yaml", "gsm8k-qwen2.5-72b.yaml"):
        result = CliRunner().invoke(app, ["validate", "--no-check-paths", str(REPO_ROOT / "configs" / name), "--json"])
        assert result.exit_code == 0, result.output
        memory = json.loads(result.stdout)["memory"]
        assert memory["gpu_source"] == "train.gpu_memory_gb" and memory["gpu_bytes"] == 80 * GB
        assert (memory["engine"] or {}).get("fits") is not False and (memory["train"] or {}).get("fits") is not False


def test_the_72b_engine_needs_four_ranks_on_80_gb():
    """bf16 weights over the ranks plus one 4,096-token sequence's KV cache, against 0.9 x 80 GB."""
    cfg = _config("gsm8k-qwen2.5-72b.yaml")
    assert cfg.cluster.tensor_parallel_size == cfg.cluster.gpus_per_engine == 4
    layer = (8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 29568) + (8192 + 2 * 1024) + 2 * 8192
    params = 2 * 152064 * 8192 + 80 * layer + 8192  # embeddings + LM head (untied) + layers + final norm
    kv_per_token = 80 * 2 * (8 // 4) * 128 * 2  # layers x (k, v) x kv heads per rank x head_dim x bf16
    plan = engine_memory(ARCH_72B, "bfloat16", 4096, 4, 0.9, 80 * GB)
    assert (plan.params, plan.weights, plan.kv_cache) == (params, math.ceil(params * 2 / 4), kv_per_token * 4096)
    assert plan.fits and plan.budget == int(0.9 * 80 * GB)
    raw = yaml.safe_load((REPO_ROOT / "configs" / "gsm8k-qwen2.5-72b.yaml").read_text())
    raw["cluster"].update(tensor_parallel_size=2, gpus_per_engine=2)
    report = plan_config(parse_config(raw, check_paths=False))
    [problem] = report.problems
    assert problem.startswith("engines: weights 67.7 GiB") and "tensor_parallel_size 2" in problem
    assert problem.endswith("fits with cluster.tensor_parallel_size: 4 and gpus_per_engine: 4")


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "configs" / "gsm8k-qwen2.5-72b.yaml").read_text())
    raw["cluster"].update(tensor_parallel_size=3, gpus_per_engine=3)
    path = tmp_path / "tp3.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", "--no-check-paths", str(path)])
    assert result.exit_code == 2
    assert "tensor_parallel_size 3 does not divide the 64 attention heads of Qwen/Qwen2.5-72B-Instruct" in \
        result.output
    toy = yaml.safe_load((REPO_ROOT / "configs" / "toy.yaml").read_text())  # the toy policy: 4 heads, config.json
    toy["cluster"].update(tensor_parallel_size=3, cpus_per_engine=3)
    result = CliRunner().invoke(app, ["validate", str(_write(tmp_path, toy))])
    assert result.exit_code == 2 and "does not divide the 4 attention heads" in result.output
    toy["cluster"].update(tensor_parallel_size=2, cpus_per_engine=1)
    result = CliRunner().invoke(app, ["validate", str(_write(tmp_path, toy))])
    assert result.exit_code == 2 and "cpus_per_engine (1) must be at least tensor_parallel_size (2)" in result.output


def _write(tmp_path, raw: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_unknown_model_cannot_be_planned_and_no_gpu_memory_skips_the_check():
    raw = yaml.safe_load((REPO_ROOT / "configs" / "prm-qwen2.5-math-7b.yaml").read_text())
    raw["train"]["model_path"] = "prm-factory-tests/not-a-known-model"
    report = plan_config(parse_config(raw, check_paths=False))
    assert report.ok and report.train is None
    assert any(n.startswith("train: cannot plan: no config.json for prm-factory-tests/not-a-known-model") for n in
               report.notes)
    del raw["train"]["gpu_memory_gb"]
    raw["train"]["model_path"] = "Qwen/Qwen2.5-Math-7B-Instruct"
    report = plan_config(parse_config(raw, check_paths=False), detect=False)
    assert report.ok and report.train["fits"] is None and report.gpu_bytes is None
    assert "memory check skipped: no train.gpu_memory_gb in the config and no GPU detected" in report.notes


def test_the_planner_knows_the_heads_token_feature_widths():
    from cluster.memory_plan import TOKEN_FEATURE_WIDTH
    from tasks.prm.model import TOKEN_FEATURE_WIDTH as MODEL_WIDTHS

    assert TOKEN_FEATURE_WIDTH == MODEL_WIDTHS
