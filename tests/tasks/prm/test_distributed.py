"""DDP against FSDP2 on 2 gloo ranks (tasks/prm/distributed.py with train_step), spawned straight from torch: the
same losses and weights, half the state per rank, mixed precision that moves float32 master weights, gradient
accumulation equal to the big batch, and sharded checkpoints that reload and consolidate. Ray Train's own path
(kill and resume) is tests/cluster/test_train_fsdp.py."""

from __future__ import annotations

import pytest
import torch

from tests.distributed_helpers import BATCH, EXPERIMENTS, TOY, prm_config, rank_rows, read, spawn, toy_rows

WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every experiment once, on one 2-rank gloo group (~1 min on 2 busy cores)."""
    return spawn(list(EXPERIMENTS), tmp_path_factory.mktemp("dist"), WORLD)


def _max_diff(tensors: dict, a: str, b: str) -> float:
    keys = [k.split("/", 1)[1] for k in tensors if k.startswith(a + "/")]
    assert keys and all(f"{b}/{k}" in tensors for k in keys)
    return max(float((tensors[f"{a}/{k}"] - tensors[f"{b}/{k}"]).abs().max()) for k in keys)


def test_fsdp_trains_as_ddp_does(runs):
    """fp32, same seed and rows: per-step losses within 1e-4 over 10 steps on each rank, and the final weights
    within 1e-5 (stated tolerance; on CPU gloo they come out bit for bit the same)."""
    for rank in range(WORLD):
        numbers, tensors = read(runs, "ddp_vs_fsdp", rank)
        assert len(numbers["ddp_losses"]) == 10
        assert numbers["fsdp_losses"] == pytest.approx(numbers["ddp_losses"], abs=1e-4)
        assert numbers["ddp_losses"][-1] < numbers["ddp_losses"][0]  # it trained
        assert _max_diff(tensors, "fsdp", "ddp") <= 1e-5


def test_fsdp_holds_a_world_size_share_of_the_state(runs):
    """Bytes of parameters, gradients and AdamW states on each rank (its local shards): 1/world of DDP's, +-10%."""
    for rank in range(WORLD):
        numbers, _ = read(runs, "ddp_vs_fsdp", rank)
        ddp, fsdp = numbers["ddp_bytes"], numbers["fsdp_bytes"]
        assert ddp["params"] > 3_000_000 and ddp["grads"] == ddp["params"] and ddp["optimizer"] >= 2 * ddp["params"]
        for part in ("params", "grads", "optimizer", "total"):
            assert fsdp[part] == pytest.approx(ddp[part] / WORLD, rel=0.10), part


def test_accumulated_batches_equal_the_big_batch(runs):
    """grad_accum: 2 pieces of b rows give the step of one batch of 2b (fp32), under FSDP and under DDP."""
    for rank in range(WORLD):
        numbers, tensors = read(runs, "accumulation", rank)
        for strategy in ("fsdp", "ddp"):
            assert numbers[f"{strategy}_2_losses"] == pytest.approx(numbers[f"{strategy}_1_losses"], abs=1e-5)
            assert _max_diff(tensors, f"{strategy}_2", f"{strategy}_1") <= 1e-4


def test_bf16_mixed_moves_float32_master_weights_where_bf16_weights_stay(runs):
    """At lr 1e-5 for 10 steps: bf16-mixed (FSDP, bf16 compute) changes nearly every float32 master weight of the
    backbone; the same steps on bf16 weights leave most of them as they were (why `dtype: bfloat16` is refused)."""
    from transformers import AutoTokenizer

    from tasks.prm.model import build_prm
    from tasks.prm.training import train_step

    for rank in range(WORLD):
        numbers, _ = read(runs, "bf16_mixed", rank)
        assert numbers["finite"] and numbers["param_dtypes"] == ["torch.float32"]
        assert numbers["optimizer_dtypes"] == ["torch.float32"]
        assert numbers["changed"] / numbers["total"] > 0.9

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(TOY))
    rows = toy_rows(64, seed=3)
    model = build_prm({**prm_config(), "backbone": str(TOY)}, "bfloat16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    for step in range(10):  # the same rows per step as both ranks together
        train_step(model, opt, tok, rank_rows(rows, step, 0, 1, WORLD * BATCH), "labels", 256, 0.5, "cpu", "x")
    same = sum(int((p == before[n]).sum()) for n, p in model.backbone.named_parameters())
    assert same / sum(p.numel() for p in before.values()) > 0.5  # measured: 95% unchanged


def test_heads_features_checkpointing_and_fp16_under_both_strategies(runs):
    """The heads reading every token with the LM's token features train the same under FSDP as under DDP;
    activation checkpointing changes no number; fp16-mixed with loss scaling trains (close to fp32)."""
    for rank in range(WORLD):
        n, _ = read(runs, "features", rank)
        assert n["fsdp_tokens"] == pytest.approx(n["ddp_tokens"], abs=1e-4)
        assert n["fsdp_tokens"][-1] != n["fsdp_tokens"][0]
        for strategy in ("ddp", "fsdp"):
            assert n[f"{strategy}_ac"] == pytest.approx(n[f"{strategy}_plain"], abs=1e-5)
            assert n[f"{strategy}_fp16"] == pytest.approx(n[f"{strategy}_plain"], abs=5e-3)
            assert n[f"{strategy}_fp16_scale"] > 0


def test_sharded_checkpoint_reloads_and_consolidates(runs, tmp_path):
    """Each rank writes only its shard; a fresh FSDP model loads the shards and steps as the original; the shards
    consolidate (a group of tensors at a time) into a model.safetensors that `load_prm` scores with."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from tasks.prm.distributed import SHARDED_DIR, consolidate_sharded, sharded_tensors
    from tasks.prm.model import WEIGHTS_NAME, load_prm, save_checkpoint_files, weights_metadata

    first, tensors = read(runs, "sharded_checkpoint", 0)
    second, _ = read(runs, "sharded_checkpoint", 1)
    assert first["files"] == [".metadata", "__0_0.distcp"] and second["files"] == ["__1_0.distcp"]
    assert _max_diff(tensors, "restored", "trained") == 0.0
    for numbers in (first, second):
        assert numbers["fresh_loss"] == pytest.approx(numbers["next_loss"], abs=1e-6)

    merged = runs / "ckpt" / SHARDED_DIR
    trained = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("trained/")}
    assert set(sharded_tensors(merged)) == set(trained)
    cfg = prm_config()
    out = save_checkpoint_files(AutoConfig.from_pretrained(str(TOY)), cfg, tmp_path / "model",
                                AutoTokenizer.from_pretrained(str(TOY)))
    consolidate_sharded(merged, out / WEIGHTS_NAME, weights_metadata(cfg))
    whole = load_file(str(out / WEIGHTS_NAME))
    assert set(whole) == set(trained) and all(torch.equal(whole[k], trained[k]) for k in whole)
    prm = load_prm(out)
    row = toy_rows(2)[0]
    (scores,) = prm.score([row["prompt"]], [row["completions"]])
    assert len(scores.mean) == len(row["completions"]) and all(0 < m < 1 for m in scores.mean)


def test_a_backbone_without_decoder_layers_is_refused_before_any_worker():
    """FSDP wraps decoder layers; a backbone naming none is refused with a line that says so (no process group
    is needed to find out), as is activation checkpointing on a model that cannot do it."""
    from tasks.prm.distributed import StrategyError, check_backbone, wrap_model
    from tasks.prm.model import ProcessRewardModel

    class Flat(torch.nn.Module):
        config = type("C", (), {"hidden_size": 4})()

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(StrategyError, match=r"strategy fsdp wraps each decoder layer, and Flat names none"):
        check_backbone(Flat(), "fsdp", False)
    assert check_backbone(Flat(), "ddp", False) == 0
    with pytest.raises(StrategyError, match="does not support gradient checkpointing"):
        check_backbone(Flat(), "ddp", True)
    with pytest.raises(StrategyError, match="Flat names none"):
        wrap_model(ProcessRewardModel(Flat(), 2, [4]), "fsdp")
