"""The PRM's pieces on hand-made tensors (heads, loss, masking, truncation), its checkpoints, and the trainer's
pure helpers (held-out split, dataset checks, NaN stop). No Ray here: tests/cluster/test_train.py runs Ray Train."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cluster.train import _failure_line
from configs.schema import REPO_ROOT
from tasks.prm.model import (
    CheckpointError,
    EnsembleHeads,
    build_prm,
    collate,
    encode_trajectory,
    ensemble_loss,
    load_prm,
    make_prm_config,
    prm_config_hash,
    save_checkpoint,
    score_trajectories,
    target_tensor,
)
from tasks.prm.training import NaNLossError, TrainError, dataset_shards, is_held_out, row_states, train_step

TOY = REPO_ROOT / "assets" / "toy-policy"


class CharTokenizer:
    """One token per character, BOS id 1 in front when special tokens are asked for."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def _set_heads(heads: EnsembleHeads, first: list[torch.Tensor], last: torch.Tensor) -> None:
    with torch.no_grad():
        for e, w in enumerate(first):
            heads.weights[0][e].copy_(w)
            heads.weights[1][e].copy_(last)
        for b in heads.biases:
            b.zero_()


def test_heads_compute_relu_mlps_per_head():
    heads = EnsembleHeads(hidden_size=2, num_heads=2, head_hidden=[2], seed=0)
    _set_heads(heads, [torch.eye(2), -torch.eye(2)], torch.ones(2, 1))
    logits = heads(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    # head 0: relu([1,-2]) = [1,0] -> 1; relu([3,.5]) -> 3.5.  head 1: relu([-1,2]) -> 2; relu([-3,-.5]) -> 0.
    assert logits.tolist() == [[1.0, 2.0], [3.5, 0.0]]


def test_heads_differ_by_seed_and_repeat_for_the_same_seed():
    a, b = EnsembleHeads(8, 3, [4, 4], seed=5), EnsembleHeads(8, 3, [4, 4], seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    w = a.weights[0]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    bound = 1 / math.sqrt(8)  # Linear's default range for fan_in 8
    assert float(w.detach().abs().max()) <= bound
    c = EnsembleHeads(8, 3, [4, 4], seed=6)
    assert not torch.equal(c.weights[0][0], w[0])


def test_pull_is_the_squared_distance_from_init_per_head():
    heads = EnsembleHeads(4, 2, [3], seed=0)
    assert heads.pull().tolist() == [0.0, 0.0]
    with torch.no_grad():
        heads.weights[0][1, 0, 0] += 0.1
        heads.biases[1][1, 0] -= 0.2
    assert heads.pull().tolist() == pytest.approx([0.0, 0.01 + 0.04])
    # per parameter: a head of 4*3 + 3 + 3*1 + 1 = 19 parameters
    assert heads.pull("mean").tolist() == pytest.approx([0.0, 0.05 / 19])


def test_loss_is_mean_over_heads_of_masked_bce_plus_pull():
    logits = torch.tensor([[0.0, math.log(3)], [5.0, -5.0]])  # second step masked (NaN target)
    targets = torch.tensor([1.0, math.nan])
    loss, parts = ensemble_loss(logits, targets, torch.tensor([1.0, 0.0]), pull_lambda=0.5)
    # head 0: p=0.5 -> ln 2 + 0.5*1; head 1: p=0.75 -> -ln .75; mean of the two.
    assert float(loss) == pytest.approx((math.log(2) + 0.5 - math.log(0.75)) / 2, abs=1e-6)
    assert parts["steps"] == 1 and parts["bce"] == pytest.approx((math.log(2) - math.log(0.75)) / 2, abs=1e-6)
    soft, _ = ensemble_loss(logits[:1], torch.tensor([0.5]), torch.zeros(2), pull_lambda=0.5)
    assert float(soft) == pytest.approx((math.log(2) + 0.5 * (-math.log(0.75) - math.log(0.25))) / 2, abs=1e-6)


def test_loss_without_usable_steps_is_only_the_pull_and_keeps_gradients():
    logits = torch.zeros(3, 2, requires_grad=True)
    loss, parts = ensemble_loss(logits, torch.full((3,), math.nan), torch.tensor([0.2, 0.4]), pull_lambda=1.0)
    assert float(loss.detach()) == pytest.approx(0.3) and parts["steps"] == 0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(3, 2))


def test_encoding_marks_step_ends_empty_steps_and_truncation():
    tok = CharTokenizer()
    enc = encode_trajectory(tok, "Q\n", ["1+1=2\n", "", "Answer: 2"], max_length=64)
    # BOS, 'Q', '\n' = positions 0..2; step 0 ends at 2+6=8; the empty step stays there; step 2 ends at 17.
    assert enc.step_ends == [8, 8, 17] and enc.empty_steps == [False, True, False] and not enc.truncated
    assert len(enc.input_ids) == 18
    cut = encode_trajectory(tok, "Q\n", ["1+1=2\n", "", "Answer: 2"], max_length=12)
    assert cut.truncated and cut.step_ends == [8, 8, -1] and len(cut.input_ids) == 12


def test_targets_mask_null_labels_empty_and_cut_steps():
    tok = CharTokenizer()
    encoded = [encode_trajectory(tok, "Q\n", ["a\n", "", "b"], 5), encode_trajectory(tok, "Q\n", ["ab"], 64)]
    t = target_tensor([[True, 1.0, 0.0], [None]], encoded, steps=3)
    nan = math.nan
    expected = torch.tensor([[1.0, nan, nan], [nan, nan, nan]])  # empty step; cut ('b' ends at 5); null; pad
    assert torch.equal(torch.isnan(t), torch.isnan(expected)) and t[0, 0] == 1.0
    with pytest.raises(ValueError, match="outside"):
        target_tensor([[1.5]], [encoded[1]], steps=1)
    with pytest.raises(ValueError, match="2 targets for 1 steps"):
        target_tensor([[1.0, 0.0]], [encoded[1]], steps=1)
    batch = collate(encoded, pad_id=0)
    assert batch["step_ends"].tolist() == [[4, 4, -1], [4, -1, -1]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 5]


def _toy_config(**over) -> dict:
    args = {"backbone": str(TOY), "hidden_size": 128, "num_heads": 3, "head_hidden": [16, 16], "target": "labels",
            "max_length": 256, "seed": 1, **over}
    return make_prm_config(**args)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    cfg = _toy_config()
    model = build_prm(cfg)
    tok = AutoTokenizer.from_pretrained(str(TOY))
    out = save_checkpoint(model, cfg, tmp_path_factory.mktemp("ckpt") / "model", tok)
    return out, model, tok


PROMPTS = ["Start at 5. Apply in order: +3.\n", "Start at 2. Apply in order: *4, -1.\n"]
STEPS = [["5+3=8\n", "Answer: 8"], ["2*4=8\n", "8-1=7\n", "Answer: 7"]]


def test_checkpoint_round_trip_scores_identically(toy_checkpoint):
    path, model, tok = toy_checkpoint
    before = score_trajectories(model, tok, PROMPTS, STEPS, 256)
    loaded = load_prm(path.parent)  # a run dir holding model/ works too
    after = loaded.score(PROMPTS, STEPS, batch_size=1)
    flat = [m for s in after for m in s.mean]
    assert flat == pytest.approx([m for s in before for m in s.mean], abs=1e-6)
    assert len(set(flat)) == 5  # five different steps, five different scores
    assert [len(s.mean) for s in after] == [2, 3] and all(not s.truncated for s in after)
    probs = torch.sigmoid(model(**{k: v for k, v in collate([encode_trajectory(tok, PROMPTS[0], STEPS[0], 256)], 0)
                                  .items()})).detach()[0]
    assert after[0].std == pytest.approx(probs.std(-1, unbiased=False).tolist(), abs=1e-6)  # population std
    assert loaded.config["num_heads"] == 3 and loaded.max_length == 256
    long = loaded.score(["x" * 300], [["1\n", "2"]])
    assert long[0].truncated and all(math.isnan(v) for v in long[0].mean) and loaded.truncations == 1


def test_checkpoint_from_another_config_fails_clearly(toy_checkpoint, tmp_path):
    import shutil

    path, _, _ = toy_checkpoint
    with pytest.raises(CheckpointError, match="expected 0123"):
        load_prm(path, expect_hash="0123")
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    cfg = json.loads((edited / "prm_config.json").read_text())
    cfg["num_heads"] = 4
    (edited / "prm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="was edited"):
        load_prm(edited)
    cfg["config_hash"] = prm_config_hash(cfg)  # a consistent config whose shapes differ from the weights
    (edited / "prm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not fit .*heads.biases.0: checkpoint \(3, 16\) vs config"
                                              r" \(4, 16\)"):
        load_prm(edited)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_prm(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a PRM checkpoint"):
        load_prm(tmp_path)


def test_nan_loss_stops_naming_the_batch_and_leaves_weights(toy_checkpoint):
    _, _, tok = toy_checkpoint
    model = build_prm(_toy_config())
    with torch.no_grad():
        model.heads.weights[1][0, 0, 0] = math.nan
    before = model.heads.weights[0].detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    rows = [{"prompt": PROMPTS[0], "completions": STEPS[0], "labels": [True, True], "problem_id": "p-7"}]
    with pytest.raises(NaNLossError, match=r"at epoch 2, step 9 \(problem_ids \['p-7'\]\)"):
        train_step(model, opt, tok, rows, "labels", 256, 0.5, "cpu", "epoch 2, step 9")
    assert torch.equal(model.heads.weights[0], before)
    # A batch whose every target is null trains nothing but the pull (zero at init): loss 0, no error.
    rows[0]["labels"] = [None, None]
    healthy = build_prm(_toy_config())
    loss, parts, cut = train_step(healthy, torch.optim.AdamW(healthy.parameters()), tok, rows, "labels", 256, 0.5,
                                  "cpu", "x")
    assert loss == 0.0 and parts["steps"] == 0 and cut == 0


@pytest.mark.parametrize("reads", ["end", "tokens"])
def test_cached_states_train_the_heads_as_the_backbone_does(toy_checkpoint, reads):
    """A frozen backbone's states, computed once (row_states), give the same loss and the same heads after two
    steps as running the backbone in every step; a trainable backbone is refused."""
    _, _, tok = toy_checkpoint
    rows = [{"prompt": p, "completions": s, "labels": [True] * (len(s) - 1) + [False], "problem_id": f"p{i}"}
            for i, (p, s) in enumerate(zip(PROMPTS, STEPS, strict=True))]
    config = _toy_config(reads=reads, token_features="distribution")
    runs = []
    for cached in (False, True):
        model = build_prm(config)
        model.backbone.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        states = row_states(model, tok, rows, 256) if cached else None
        assert states is None or [len(x) for x in states] == [len(tok(r["prompt"])["input_ids"]) + sum(
            len(tok(c, add_special_tokens=False)["input_ids"]) for c in r["completions"]) for r in rows]
        losses = [train_step(model, opt, tok, rows, "labels", 256, 0.5, "cpu", "x", "mean", states=states)[0]
                  for _ in range(2)]
        runs.append((losses, [w.detach().clone() for w in model.heads.weights]))
    (loss_a, heads_a), (loss_b, heads_b) = runs
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and loss_a[1] != loss_a[0]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(heads_a, heads_b, strict=True))
    trainable = build_prm(config)
    with pytest.raises(ValueError, match="frozen backbone"):
        row_states(trainable, tok, rows, 256)


def test_held_out_split_is_stable_and_near_its_fraction():
    ids = [f"p{i}" for i in range(2000)]
    held = [i for i in ids if is_held_out(i, 0.2, 0)]
    assert held == [i for i in ids if is_held_out(i, 0.2, 0)]
    assert 340 < len(held) < 460  # binomial(2000, 0.2): mean 400, sd 18
    assert not any(is_held_out(i, 0.0, 0) for i in ids[:50])
    assert held != [i for i in ids if is_held_out(i, 0.2, 1)]


def test_dataset_checks_fail_before_ray(tmp_path):
    with pytest.raises(TrainError, match="dataset directory not found"):
        dataset_shards(tmp_path / "missing")
    with pytest.raises(TrainError, match="no manifest.json"):
        dataset_shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"path": "shards/part-00000.parquet"}]}))
    with pytest.raises(TrainError, match="missing"):
        dataset_shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"path": "../elsewhere.parquet"}]}))
    with pytest.raises(TrainError, match="is not shards/part-XXXXX.parquet"):  # the store's path guard
        dataset_shards(tmp_path)


def test_dataset_shards_are_absolute_for_workers_in_other_directories(tmp_path, monkeypatch):
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    (tmp_path / "ds" / "shards" / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({"shards": [{"path": "shards/part-00000.parquet"}],
                                                              "dataset_version": "v"}))
    monkeypatch.chdir(tmp_path)
    paths, version = dataset_shards("ds")  # a relative dataset dir, as `prm-factory train --dataset runs/...`
    assert paths == [tmp_path / "ds" / "shards" / "part-00000.parquet"] and paths[0].is_absolute()
    assert version == "v"


def test_failure_line_names_the_workers_error():
    try:
        try:
            raise NaNLossError("non-finite loss nan at epoch 0, global step 3")
        except NaNLossError as inner:
            raise RuntimeError("Training failed\nTraceback ...\ncluster.train.NaNLossError: non-finite loss nan at "
                               "epoch 0, global step 3 (problem_ids ['a'])") from inner
    except RuntimeError as err:
        assert _failure_line(err) == "non-finite loss nan at epoch 0, global step 3 (problem_ids ['a'])"


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_gpu_prm_configs_follow_actprm(size):
    from configs.schema import load_config

    cfg = load_config(REPO_ROOT / "configs" / f"prm-qwen2.5-math-{size}.yaml", check_paths=False)
    t = cfg.train
    assert t.use_gpu and t.num_workers == 8 and t.precision == "bf16-mixed" and t.lr == 1e-5
    assert (t.num_heads, t.head_hidden, t.pull_lambda) == (8, [128, 128], 0.5)
    assert f"Qwen2.5-Math-{size.upper()}" in t.model_path


def test_train_section_errors_name_the_field():
    from configs.schema import ConfigError, load_config, parse_config

    data = load_config(REPO_ROOT / "configs" / "toy.yaml").model_dump(mode="json")
    for key, value, field in (("target", "soft", "train.target"), ("num_heads", 0, "train.num_heads"),
                              ("lernrate", 1.0, "train.lernrate"), ("model_path", "/nowhere", "train.model_path")):
        bad = {**data, "train": {**data["train"], key: value}}
        with pytest.raises(ConfigError, match=field):
            parse_config(bad)
    # The trainer section does not change the dataset's config hash (a dataset is the same whoever trains on it).
    other = {**data, "train": {**data["train"], "lr": 0.5}}
    assert parse_config(other).config_hash() == parse_config(data).config_hash()
    assert parse_config(other).train.train_hash() != parse_config(data).train.train_hash()


def test_calibration_bins_and_ece_by_hand():
    from tasks.prm.report import calibration_bins, expected_calibration_error

    bins = calibration_bins([0.05, 0.15, 0.12, 0.95, 1.0], [False, True, False, True, True], bins=10)
    assert [(b["lo"], b["count"]) for b in bins] == [(0.0, 1), (0.1, 2), (0.9, 2)]
    assert bins[1]["mean_score"] == pytest.approx(0.135) and bins[1]["fraction_true"] == 0.5
    # |0.05-0| * 1 + |0.135-0.5| * 2 + |0.975-1| * 2, over 5 steps
    assert expected_calibration_error(bins) == pytest.approx((0.05 + 0.73 + 0.05) / 5)


def test_toy_truth_and_held_out_metrics():
    from tasks.prm.model import StepScores
    from tasks.prm.report import held_out_metrics, toy_step_truth

    prompt = "Start at 2. Apply in order: *4, -1.\n"
    steps = ["2*4=8\n", "8-1=6\n", "Answer: 6"]
    assert toy_step_truth(prompt, steps, "{question}\n") == [True, False, False]
    assert toy_step_truth("What is 2+2?\n", ["4"], "{question}\n") is None
    rows = [{"prompt": prompt, "completions": steps, "labels": [True, True, False],
             "soft_labels": [0.5, None, 0.0]}]
    scores = [StepScores([0.9, 0.2, math.nan], [0.0, 0.0, math.nan], truncated=True)]
    m = held_out_metrics(rows, scores, "soft_labels", "{question}\n")
    assert m["steps"] == 2 and m["truncated_rows"] == 1
    assert m["loss"] == pytest.approx(-(0.5 * math.log(0.9) + 0.5 * math.log(0.1)))  # the null target is skipped
    assert m["auroc_vs_truth"] == 1.0 and m["accuracy_vs_truth"] == 1.0  # 0.9 true step, 0.2 false step
    assert m["accuracy_vs_labels"] == 0.5  # the labels call step 2 good


# -- what the heads read: every token (a product over tokens), the backbone's own token log-probabilities ------


def test_later_model_options_keep_old_checkpoint_hashes():
    old = {k: v for k, v in _toy_config().items() if k not in ("reads", "token_features", "head_init", "config_hash")}
    assert prm_config_hash(old) == _toy_config()["config_hash"]  # written before the options existed
    assert _toy_config(reads="tokens")["config_hash"] != _toy_config()["config_hash"]
    assert _toy_config(token_features="logprob")["config_hash"] != _toy_config()["config_hash"]
    assert _toy_config(head_init="trunc-normal")["config_hash"] != _toy_config()["config_hash"]


def test_token_reads_score_a_prefix_as_the_product_over_its_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOY))
    model = build_prm(_toy_config(reads="tokens")).eval()
    steps = ["2*4=8\n", "8-1=7\n", "Answer: 7"]
    batch = collate([encode_trajectory(tok, PROMPTS[1], steps, 256)], 0)
    with torch.no_grad():
        step_p = torch.sigmoid(model(**batch))[0]  # [S, E]
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        token_p = torch.sigmoid(model.heads(hidden[0]) + 5.0)  # [T, E]: every token's own "fine" probability
    start = int(batch["completion_mask"][0].float().argmax())
    for j, end in enumerate(batch["step_ends"][0].tolist()):
        assert step_p[j].tolist() == pytest.approx(token_p[start:end + 1].prod(0).tolist(), rel=1e-4)
    assert (step_p[1:] <= step_p[:-1] + 1e-7).all()  # a prefix can only get less likely to be right


def test_token_reads_skip_the_prompt_and_padding_without_changing_a_value_or_a_gradient():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOY))
    model = build_prm(_toy_config(reads="tokens", token_features="distribution"))
    batch = collate([encode_trajectory(tok, PROMPTS[0], STEPS[0], 256),
                     encode_trajectory(tok, PROMPTS[1], ["2*4=8\n", "Answer: 8"], 256)], 0)
    mask = batch["completion_mask"]
    assert (~mask & batch["attention_mask"].bool()).any() and (~batch["attention_mask"].bool()).any()
    with torch.no_grad():
        hidden = model.token_states(batch["input_ids"], batch["attention_mask"])
    ours = model.read(hidden, batch["step_ends"], mask)
    ours.sum().backward()
    ours_grad = [w.grad.clone() for w in model.heads.weights]
    model.zero_grad()
    # Every token through the heads, the prompt's and padding's then masked to 0: what read computed before.
    b, t, h = hidden.shape
    fine = torch.nn.functional.logsigmoid(model.heads(hidden.reshape(-1, h)).reshape(b, t, -1) + 5.0) * mask[..., None]
    index = batch["step_ends"].clamp(min=0)
    log_p = torch.gather(fine.cumsum(1), 1, index[..., None].expand(-1, -1, fine.shape[-1])).clamp(max=-1e-6)
    full = log_p - torch.log(-torch.expm1(log_p))
    full.sum().backward()
    assert torch.allclose(ours, full, atol=1e-5)
    for g, w in zip(ours_grad, model.heads.weights, strict=True):
        assert torch.allclose(g, w.grad, atol=1e-5) and g.abs().sum() > 0


def test_logprob_feature_is_the_backbones_own_token_log_probability():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOY))
    model = build_prm(_toy_config(token_features="logprob")).eval()
    assert model.heads.weights[0].shape[1] == 128 + 1  # the hidden state plus one feature
    batch = collate([encode_trajectory(tok, PROMPTS[0], STEPS[0], 256)], 0)
    lm = AutoModelForCausalLM.from_pretrained(str(TOY)).eval()
    with torch.no_grad():
        hidden = model.backbone(input_ids=batch["input_ids"]).last_hidden_state
        ours = model._token_features(hidden, batch["input_ids"])[0, :, 0]
        logp = torch.log_softmax(lm(input_ids=batch["input_ids"]).logits[0], dim=-1)
    ids = batch["input_ids"][0]
    expected = [0.0] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert ours.tolist() == pytest.approx(expected, abs=1e-4)


def test_distribution_features_are_the_gap_to_the_first_choice_and_the_entropy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOY))
    model = build_prm(_toy_config(token_features="distribution")).eval()
    assert model.heads.weights[0].shape[1] == 128 + 3
    batch = collate([encode_trajectory(tok, PROMPTS[0], STEPS[0], 256)], 0)
    lm = AutoModelForCausalLM.from_pretrained(str(TOY)).eval()
    with torch.no_grad():
        hidden = model.backbone(input_ids=batch["input_ids"]).last_hidden_state
        ours = model._token_features(hidden, batch["input_ids"])[0]
        logp = torch.log_softmax(lm(input_ids=batch["input_ids"]).logits[0], dim=-1)
    ids = batch["input_ids"][0]
    assert ours[0].tolist() == [0.0, 0.0, 0.0]  # the first token has no context
    for t in range(1, len(ids)):
        row = logp[t - 1]
        taken = float(row[ids[t]])
        expected = [taken, taken - float(row.max()), float(-(row.exp() * row).sum())]
        assert ours[t].tolist() == pytest.approx(expected, abs=1e-4)
    # The gap is 0 exactly where the token was the LM's first choice, and never positive.
    first_choice = [int(logp[t - 1].argmax()) == int(ids[t]) for t in range(1, len(ids))]
    assert [abs(float(g)) < 1e-6 for g in ours[1:, 1]] == first_choice
    assert any(first_choice) and not all(first_choice)  # the case tells the two apart


def test_a_tokens_logprob_checkpoint_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOY))
    cfg = _toy_config(reads="tokens", token_features="logprob")
    model = build_prm(cfg)
    before = score_trajectories(model, tok, PROMPTS, STEPS, 256)
    after = load_prm(save_checkpoint(model, cfg, tmp_path / "model", tok)).score(PROMPTS, STEPS)
    assert [m for s in after for m in s.mean] == pytest.approx([m for s in before for m in s.mean], abs=1e-6)
    assert load_prm(tmp_path / "model").config["reads"] == "tokens"


# -- a diverse ensemble (ActPRM's reference code): truncated-normal heads, per-head data masks -------------------


def test_uniform_heads_are_linears_default_range_from_each_heads_seed():
    """The default init, pinned to its formula: what every checkpoint before head_init was written with."""
    heads = EnsembleHeads(6, 3, [5, 4], seed=7)
    assert all(torch.equal(x, y) for x, y in zip(heads.state_dict().values(),
                                                 EnsembleHeads(6, 3, [5, 4], 7, "uniform").state_dict().values(),
                                                 strict=True))
    for e in range(3):
        gen = torch.Generator().manual_seed(7 * 1_000_003 + e)
        for w, b in zip(heads.weights, heads.biases, strict=True):
            bound = 1 / math.sqrt(w.shape[1])
            assert torch.equal(w[e], torch.rand(w.shape[1:], generator=gen) * 2 * bound - bound)
            assert torch.equal(b[e], torch.rand(b.shape[1:], generator=gen) * 2 * bound - bound)


def test_trunc_normal_heads_have_the_truncated_std_zero_biases_and_differ():
    heads = EnsembleHeads(1024, 3, [256], seed=2, init="trunc-normal")
    sigma = 1 / (2 * math.sqrt(1024))
    # the std of N(0, sigma^2) cut at +-2 sigma: sigma * sqrt(1 - 2 * 2 phi(2) / (Phi(2) - Phi(-2)))
    phi2, mass = math.exp(-2) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    expected = sigma * math.sqrt(1 - 4 * phi2 / mass)  # 0.8796 sigma
    w = heads.weights[0].detach()
    for e in range(3):  # 262,144 draws a head: the sample std is within ~0.2% of the true one
        assert float(w[e].std()) == pytest.approx(expected, rel=0.01)
        assert abs(float(w[e].mean())) < 0.01 * sigma
    assert float(w.abs().max()) <= 2 * sigma and float(w.abs().max()) > 1.9 * sigma
    last = heads.weights[1].detach()  # fan_in 256: its own std
    assert float(last.abs().max()) <= 2 / (2 * math.sqrt(256))
    assert all(torch.equal(b, torch.zeros_like(b)) for b in heads.biases)
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    again = EnsembleHeads(1024, 3, [256], seed=2, init="trunc-normal")
    assert torch.equal(again.weights[0], heads.weights[0]) and torch.equal(heads.init_weight_0, heads.weights[0])
    with pytest.raises(ValueError, match="head init must be one of"):
        EnsembleHeads(4, 2, [3], init="normal")


def test_a_prm_config_from_before_head_init_builds_and_loads_uniform_heads(toy_checkpoint, tmp_path):
    import shutil

    path, model, _ = toy_checkpoint
    old = tmp_path / "old"
    shutil.copytree(path, old)
    cfg = json.loads((old / "prm_config.json").read_text())
    del cfg["head_init"]  # as a checkpoint written before the option: its hash is the same
    (old / "prm_config.json").write_text(json.dumps(cfg))
    assert load_prm(old).model.heads.init_weight_0.equal(model.heads.init_weight_0)
    fresh = build_prm(cfg).heads
    assert all(torch.equal(w, EnsembleHeads(128, 3, [16, 16], seed=1).weights[i]) for i, w in enumerate(fresh.weights))
    normal = build_prm(_toy_config(head_init="trunc-normal")).heads
    assert all(torch.equal(b, torch.zeros_like(b)) for b in normal.biases)
    assert not torch.equal(normal.weights[0], fresh.weights[0])


def test_a_head_mask_keeps_each_heads_bce_to_its_own_steps():
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [5.0, -5.0]], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, math.nan])  # the third step has no target
    pull = torch.zeros(2)
    # head 0 keeps steps 0 and 1; head 1 keeps only the step without a target: no usable step of its own
    mask = torch.tensor([[True, False], [True, False], [True, True]])
    loss, parts = ensemble_loss(logits, targets, pull, 0.5, head_mask=mask)
    head0 = (math.log(2) + math.log(4)) / 2  # p = 0.5 vs 1; p = 0.75 vs 0
    assert float(loss.detach()) == pytest.approx(head0 / 2) and parts["bce"] == pytest.approx(head0 / 2)
    assert parts["steps"] == 2
    loss.backward()
    # d loss / d logit = (p - y) / (kept steps of the head) / heads; head 1 and the untargeted step get nothing
    assert logits.grad.flatten().tolist() == pytest.approx([-0.125, 0.0, 0.1875, 0.0, 0.0, 0.0])
    # head 1 keeping step 1 only: its BCE is that step's alone (p = 0.5 vs 0)
    mask[1, 1] = True
    _, parts = ensemble_loss(logits, targets, pull, 0.5, head_mask=mask)
    assert parts["bce"] == pytest.approx((head0 + math.log(2)) / 2)
    # a mask keeping everything is the unmasked loss; a per-head bce_weight weighs each head's BCE
    full, _ = ensemble_loss(logits, targets, pull, 0.5)
    everything = ensemble_loss(logits, targets, pull, 0.5, head_mask=torch.ones(3, 2, dtype=torch.bool))[0]
    assert float(everything.detach()) == pytest.approx(float(full.detach()), abs=1e-7)
    weighted, parts = ensemble_loss(logits, targets, pull, 0.5, bce_weight=torch.tensor([1.0, 0.0]), head_mask=mask)
    assert float(weighted.detach()) == pytest.approx(head0 / 2) and parts["bce_term"] == pytest.approx(head0 / 2)


def _mask_rows() -> list[dict]:
    """Four rows of 2, 3, 1 and 2 steps, so a head's kept steps differ from piece to piece."""
    rows = [{"prompt": p, "completions": s, "labels": [True] * (len(s) - 1) + [False], "problem_id": f"p{i}"}
            for i, (p, s) in enumerate(zip(PROMPTS, STEPS, strict=True))]
    rows.append({"prompt": "Start at 3. Apply in order: -1.\n", "completions": ["Answer: 2"], "labels": [True],
                 "problem_id": "p2"})
    rows.append({"prompt": "Start at 1. Apply in order: +1.\n", "completions": ["1+1=3\n", "Answer: 3"],
                 "labels": [False, False], "problem_id": "p3"})
    return rows


def _one_step(config: dict, tok, rows: list[dict], seed: int, **options) -> tuple[float, dict, list[torch.Tensor]]:
    """One train_step (lr 0: the gradients stay to compare) from a fresh model and global RNG seed."""
    model = build_prm(config)
    torch.manual_seed(seed)
    loss, parts, _ = train_step(model, torch.optim.SGD(model.heads.parameters(), lr=0.0), tok, rows, "labels", 256,
                                0.5, "cpu", "x", **options)
    return loss, parts, [p.grad.clone() for p in model.heads.parameters()]


def test_learning_probability_one_is_todays_step_and_draws_nothing(toy_checkpoint):
    _, _, tok = toy_checkpoint
    rows, config = _mask_rows(), _toy_config()
    loss, parts, grads = _one_step(config, tok, rows, 0)
    before = torch.get_rng_state()
    model = build_prm(config)
    torch.set_rng_state(before)
    same = train_step(model, torch.optim.SGD(model.heads.parameters(), lr=0.0), tok, rows, "labels", 256, 0.5,
                      "cpu", "x", learning_probability=1.0)
    assert torch.equal(torch.get_rng_state(), before)  # no mask drawn, so nothing else that draws moves
    assert same[0] == loss and same[1] == parts
    assert all(torch.equal(p.grad, g) for p, g in zip(model.heads.parameters(), grads, strict=True))


def test_masked_heads_accumulate_to_the_whole_batch_head_by_head(toy_checkpoint):
    """Below 1, one [rows, heads] draw per step; 2 accumulated pieces weigh each head's BCE by its own kept steps,
    so they give the whole batch's loss and gradients, and the masks do change the step."""
    _, _, tok = toy_checkpoint
    rows, config = _mask_rows(), _toy_config()
    torch.manual_seed(0)
    kept = torch.bernoulli(torch.full((4, 3), 0.5)).bool()  # what train_step draws after the same seed
    # heads keep rows {0, 1, 2}, {1, 3}, {0, 2, 3}: 5 + 1, 3 + 2, 2 + 3 of their steps in the two pieces, shares
    # that differ from the unmasked 5 + 3, so weighing by the batch's usable steps would give another step
    assert kept.t().tolist() == [[True, True, True, False], [False, True, False, True], [True, False, True, True]]
    whole = _one_step(config, tok, rows, 0, learning_probability=0.5)
    pieces = _one_step(config, tok, rows, 0, learning_probability=0.5, micro_batches=2)
    assert pieces[0] == pytest.approx(whole[0], rel=1e-5) and pieces[1]["bce"] == pytest.approx(whole[1]["bce"])
    assert pieces[1]["steps"] == whole[1]["steps"] == 8
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole[2], pieces[2], strict=True))
    unmasked = _one_step(config, tok, rows, 0)
    assert unmasked[0] != pytest.approx(whole[0], rel=1e-3)
    # a head that keeps no row gets no BCE gradient (only its pull's, which is 0 at init); the others do
    torch.manual_seed(0)
    kept = torch.bernoulli(torch.full((4, 3), 0.3)).bool()
    assert kept.any(0).tolist() == [True, False, True]  # seed 0 at 0.3: head 1 keeps no row
    _, parts, grads = _one_step(config, tok, rows, 0, learning_probability=0.3, micro_batches=2)
    assert all(float(g[1].abs().max()) == 0.0 for g in grads)
    assert all(float(g[e].abs().max()) > 0.0 for g in grads for e in (0, 2))
    assert parts["steps"] == 8
