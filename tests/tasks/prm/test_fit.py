"""The PRM trained in one process (tasks/prm/fit.py) on the shipped toy backbone: the epoch loop learns, groups
batches as grad_accum_steps says, scores the same from cached token states as from the whole model, and a warm start
continues from a checkpoint."""

from __future__ import annotations

import pytest
import yaml

from configs.schema import REPO_ROOT, TrainConfig
from tasks.prm.fit import FittedPRM, fit, train_epoch

PROMPTS = ["Start at 5. Apply in order: +3.\n", "Start at 2. Apply in order: *4, -1.\n",
           "Start at 7. Apply in order: -2.\n", "Start at 3. Apply in order: *3, +1.\n"]
STEPS = [["5+3=8\n", "Answer: 8"], ["2*4=8\n", "8-1=6\n", "Answer: 6"], ["7-2=5\n", "Answer: 5"],
         ["3*3=9\n", "9+1=10\n", "Answer: 10"]]
LABELS = [[True, True], [True, False, False], [True, True], [True, True, True]]
ROWS = [{"problem_id": f"p{i}", "prompt": p, "completions": s, "labels": y}
        for i, (p, s, y) in enumerate(zip(PROMPTS, STEPS, LABELS, strict=True))]


def _train(**over) -> TrainConfig:
    return TrainConfig(**{"model_path": "assets/toy-policy", "num_heads": 3, "head_hidden": [16, 16],
                          "target": "labels", "reads": "tokens", "token_features": "distribution",
                          "train_backbone": False, "pull_reduction": "mean", "shuffle": True, "lr": 1e-2,
                          "epochs": 6, "batch_size": 2, **over})


def _untrained(**over) -> TrainConfig:
    """The model built (and warm-started), no epoch run: the config's epochs must be at least 1."""
    return _train(**over).model_copy(update={"epochs": 0})


def _means(scores) -> list[float]:
    return [m for s in scores for m in s.mean]


def test_fit_lowers_the_loss_and_counts_its_steps():
    fitted = fit(_train(), ROWS, 0)
    losses = [h["train_loss"] for h in fitted.history]
    assert [h["epoch"] for h in fitted.history] == list(range(6)) and fitted.steps == 6 * 2
    assert losses[-1] < 0.8 * losses[0], losses
    assert fitted.history[0]["samples"] == 4 and fitted.last_loss is not None
    again = fit(_train(), ROWS, 0)  # seeded: heads, batch order and so every step are the same
    assert [h["train_loss"] for h in again.history] == losses
    assert _means(again.score(PROMPTS, STEPS)) == _means(fitted.score(PROMPTS, STEPS))


def _optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_an_epoch_steps_once_per_grad_accum_steps_batches_and_names_the_step():
    fitted = fit(_untrained(), ROWS, 0)
    train = _train(grad_accum_steps=2).model_dump(mode="json")
    named = []

    def where(step: int, batch: int) -> str:
        named.append((step, batch))
        return f"step {step} batch {batch}"

    batches = [[r] for r in ROWS[:3]]  # 3 batches, 2 per step: a full window, then the last, shorter one
    sums = train_epoch(fitted.model, _optimizer(fitted.model), fitted.tokenizer, iter(batches), train,
                       fitted.max_length, "cpu", where)
    assert (sums.steps, sums.batches, sums.samples) == (2, 3, 3)
    assert named == [(1, 1), (2, 2)]


def test_cached_token_states_score_as_the_whole_model_and_are_computed_once():
    """A PRM trained on cached states scores the ruler as the same PRM run whole, and a second fit or scoring pass
    over the same texts computes no new states."""
    from tasks.evaluation.ruler import SHIPPED_RULERS, load_ruler

    ruler = load_ruler(*SHIPPED_RULERS["v1"]).limited(2)
    base = yaml.safe_load((REPO_ROOT / "configs" / "toy-e2e.yaml").read_text())
    train = TrainConfig(**{**base["train"], "model_path": "assets/toy-policy", "epochs": 1, "keep": "last"})
    rows = [{"problem_id": r["problem_id"], "prompt": r["prompt"], "completions": r["completions"],
             "er_labels": [float(x) for x in r["step_truth"]]} for r in ruler.rows[:12]]
    cache: dict = {}
    fitted = fit(train, rows, 0, states_cache=cache)
    assert fitted.states_cache is cache and len(cache) == len({(r["prompt"], *r["completions"]) for r in rows})
    prompts, completions = [r["prompt"] for r in ruler.rows], [r["completions"] for r in ruler.rows]
    cached = fitted.score(prompts, completions)
    whole = FittedPRM(fitted.model, fitted.tokenizer, fitted.max_length).score(prompts, completions)
    assert len(cached) == len(whole) == len(ruler.rows)
    for a, b in zip(cached, whole, strict=True):
        assert a.mean == pytest.approx(b.mean, abs=1e-5) and a.std == pytest.approx(b.std, abs=1e-5)
    assert max(s for sc in cached for s in sc.std) > 1e-4  # the heads disagree: std is compared, not two zeros
    seen = len(cache)
    fit(train, rows, 1, states_cache=cache)
    fitted.score(prompts, completions)
    assert len(cache) == seen
    # the same fit without the cache runs the backbone every step: the same heads up to float rounding
    plain = fit(train, rows, 0)
    assert plain.states_cache is None
    assert _means(plain.score(prompts, completions)) == pytest.approx(_means(whole), abs=1e-5)


def test_init_from_continues_from_a_checkpoint(tmp_path):
    from tasks.prm.model import save_checkpoint

    first = fit(_train(epochs=3), ROWS, 0)
    save_checkpoint(first.model, first.prm_config, tmp_path / "model", first.tokenizer)
    loaded = fit(_untrained(), ROWS, 0, init_from=tmp_path)  # a run dir holding model/ works too
    assert _means(loaded.score(PROMPTS, STEPS)) == pytest.approx(_means(first.score(PROMPTS, STEPS)), abs=1e-6)
    fresh, warm = fit(_train(epochs=1), ROWS, 0), fit(_train(epochs=1), ROWS, 0, init_from=tmp_path)
    assert warm.history[0]["train_loss"] < fresh.history[0]["train_loss"]
    with pytest.raises(ValueError, match="another model config"):
        fit(_untrained(num_heads=2), ROWS, 0, init_from=tmp_path)
