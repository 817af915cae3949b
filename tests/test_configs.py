"""The shipped training configs load and validate, and the two baselines differ only in their budget."""
from dataclasses import asdict

import pytest
from helpers import ROOT

from sllm.training.config import load_run_config

CONFIGS = sorted((ROOT / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    run = load_run_config(path)
    run.validate()
    assert run.train.max_steps > 0 and run.train.out_dir.startswith("runs/")


def test_the_fair_baseline_is_the_small_one_with_a_larger_budget():
    """Same model, passages, tokenizer and optimiser as the baseline compared at the stage-2 budget: only
    the steps (and so the warm-up), the threads and the logging differ (issue 18's equal-total comparison)."""
    small, fair = (asdict(load_run_config(ROOT / "configs" / f"baseline-{n}.json")) for n in ("small", "fair"))
    assert fair["opt"] == small["opt"] and fair["max_sentence_tokens"] == small["max_sentence_tokens"]
    for d in (small, fair):  # stage 1's tokenizer: the run dir, or the shipped copy of it
        assert d["data"].pop("tokenizer") in ("runs/svae-small", "models/default/svae")
    assert fair["data"] == small["data"]
    budget = ("max_steps", "warmup_steps", "threads", "eval_every", "out_dir")
    assert {k: v for k, v in fair["train"].items() if k not in budget} == \
        {k: v for k, v in small["train"].items() if k not in budget}
    assert fair["train"]["max_steps"] > 5 * small["train"]["max_steps"]
