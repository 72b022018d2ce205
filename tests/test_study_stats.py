"""The study reports' statistics by hand: binomial intervals of shares of seeds, paired per-seed differences, the
entropy-collapse test, and the reference policies' rows (`epo_trl.stats`, `research.study`)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_clopper_pearson_by_hand():
    """k = 0 and k = n have closed forms: (1 - p)^5 = 0.025 and p^5 = 0.025. 4/5: the lower end solves
    P(X >= 4 | p) = 5 p^4 (1 - p) + p^5 = 0.025 (R's binom.test(4, 5): 0.2835821), the upper one 1 - p^5 = 0.025."""
    from epo_trl.stats import clopper_pearson

    low, high = clopper_pearson(4, 5)
    assert low == pytest.approx(0.2835821, abs=1e-6) and high == pytest.approx(0.975**0.2, abs=1e-9)
    assert 5 * low**4 * (1 - low) + low**5 == pytest.approx(0.025, abs=1e-9)
    assert clopper_pearson(0, 5) == (0.0, pytest.approx(1 - 0.025**0.2, abs=1e-9))  # 0.5218
    assert clopper_pearson(5, 5) == (pytest.approx(0.025**0.2, abs=1e-9), 1.0)  # 0.4782
    with pytest.raises(ValueError):
        clopper_pearson(6, 5)


def test_wilson_by_hand():
    """(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n) with z = 1.96, n = 5: z²/n = 0.76832. 4/5: center
    1.18416 / 1.76832 = 0.669653, half 1.96 sqrt(0.070416) / 1.76832 = 0.294124. 0/5: center = half = 0.38416 /
    1.76832 = 0.217246; 5/5 mirrors it."""
    from epo_trl.stats import wilson

    assert wilson(4, 5, z=1.96) == (pytest.approx(0.375528, abs=1e-6), pytest.approx(0.963777, abs=1e-6))
    assert wilson(0, 5, z=1.96) == (0.0, pytest.approx(0.434491, abs=1e-6))
    assert wilson(5, 5, z=1.96) == (pytest.approx(0.565509, abs=1e-6), 1.0)


def test_share_and_its_cell():
    from epo_trl.stats import share
    from research.study import _share

    assert _share(share([1.0, 1.0, 0.0, 1.0, 1.0])) == "4/5 (0.28-0.99)"
    assert _share(share([0.0] * 5)) == "0/5 (0.00-0.52)" and _share(share([True] * 5)) == "5/5 (0.48-1.00)"
    assert _share(share([])) == "-"


def _run(algo: str, seed: int, after: float, unseen: float = 0.0, mode: str = "trajectory") -> dict:
    """A finished run of results.json, the fields the statistics read: learning steadily (no collapse)."""
    return {"algo": algo, "seed": seed, "mode": mode, "train_s": 60.0, "step": [1, 2, 3, 4],
            "success": [0.25, 0.5, 0.75, 1.0], "entropy": [0.08, 0.06, 0.05, 0.04], "turn_entropy": {},
            "before": {"valid_seen": 0.25, "valid_unseen": 0.0},
            "held_out": {"valid_seen": after, "valid_unseen": unseen}}  # fmt: skip


RUNS = [
    *(_run("grpo", s, a) for s, a in ((0, 0.5), (1, 0.5), (2, 0.25))),
    *(_run("epo-base", s, a) for s, a in ((0, 0.75), (1, 0.25), (2, 0.5))),
    *(_run("epo", s, a, 0.125 * s) for s, a in ((0, 0.6), (1, 0.7), (2, 0.55), (3, 1.0))),
]


def test_paired_differences_by_hand():
    """EPO - GRPO per seed on valid_seen: 0.1, 0.2, 0.3 (seed 3 has no GRPO run: left out): mean 0.2, s = 0.1,
    half-width t(0.975, 2) s / sqrt(3) = 4.303 * 0.1 / 1.7321 = 0.24843. The pairs: every algorithm vs the first,
    then EPO vs EPO-Base."""
    from epo_trl.stats import paired_differences
    from research.study import comparisons, paired

    d = paired_differences({0: 0.6, 1: 0.7, 2: 0.55, 3: 1.0}, {0: 0.5, 1: 0.5, 2: 0.25})
    assert d["seeds"] == [0, 1, 2] and d["differences"] == pytest.approx([0.1, 0.2, 0.3])
    assert d["mean"] == pytest.approx(0.2) and d["half"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert comparisons(["grpo", "epo-base", "epo"]) == [("epo-base", "grpo"), ("epo", "grpo"), ("epo", "epo-base")]
    assert comparisons(["epo", "epo-base"]) == [("epo-base", "epo")]  # EPO is the baseline: no reversed pair
    rows = {(r["method"], r["baseline"], r["split"]): r for r in paired(RUNS)}
    assert len(rows) == 6
    seen = rows[("epo", "grpo", "valid_seen")]
    assert seen["differences"] == pytest.approx([0.1, 0.2, 0.3]) and seen["half"] == pytest.approx(0.24843, abs=1e-5)
    unseen = rows[("epo", "grpo", "valid_unseen")]  # GRPO 0 on valid_unseen: EPO's own 0, 0.125, 0.25
    assert unseen["mean"] == pytest.approx(0.125) and unseen["half"] == pytest.approx(4.303 * 0.125 / 3**0.5)
    base = rows[("epo-base", "grpo", "valid_seen")]  # +0.25, -0.25, +0.25
    assert base["mean"] == pytest.approx(0.25 / 3) and base["differences"] == pytest.approx([0.25, -0.25, 0.25])
    assert rows[("epo", "epo-base", "valid_seen")]["differences"] == pytest.approx([-0.15, 0.45, 0.05])
    # runs of another rollout mode start from another warm start: not paired
    assert all(r["method"] != "epo-step" for r in paired([*RUNS, _run("epo-step", 0, 0.9, mode="step")]))


def test_entropy_collapse_needs_no_learning():
    """Collapse: entropy below 0.1 x step 1 while the train success, averaged over the quarter-run window ending
    there, is not above its first-quarter mean. Here 8 steps, quarter q = 2, first-quarter success 0.5."""
    from research.study import COLLAPSE_FRACTION, collapse_step, run_stats

    assert COLLAPSE_FRACTION == 0.1
    sharpening = [1.0, 0.8, 0.5, 0.3, 0.2, 0.09, 0.05, 0.05]
    learning = [0.5, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]
    assert collapse_step(sharpening, learning) is None  # deterministic, but learning: sharpening, not collapse
    flat = [0.5, 0.5, 0.5, 0.4, 0.5, 0.5, 0.5, 0.5]
    assert collapse_step(sharpening, flat) == 6  # step 6: 0.09 < 0.1, window (steps 5-6) mean 0.5 <= 0.5
    assert collapse_step([1.0, 0.8, 0.5, 0.3, 0.2, 0.11, 0.1, 0.1], flat) is None  # never below 0.1 x step 1
    relapse = [0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.4, 0.4]  # learned, then lost it: steps 7-8 average 0.4
    assert collapse_step(sharpening, relapse) == 8  # step 7's window (steps 6-7) averages 0.65: not yet
    run = {**_run("grpo", 0, 0.5), "entropy": sharpening, "success": flat}
    stats = run_stats(run)
    assert stats["collapsed"] == 1.0 and stats["collapse_step"] == 6.0
    stats = run_stats({**run, "success": learning})
    assert stats["collapsed"] == 0.0 and math.isnan(stats["collapse_step"])
    assert stats["before_unseen"] == 0.0 and stats["gain_seen"] == 0.25


def test_collapse_fires_on_no_committed_maze_run():
    """The former test (entropy below 0.5 x step 1) fires on most runs of docs/study/results.json (19 of 20 on the
    retired 2x2 setting, 18 of 20 on the trail maze), learning ones included; the new one fires on none of those that
    learned (held-out gain >= 0.2)."""
    from research.study import run_stats

    runs = json.loads((ROOT / "docs/study/results.json").read_text())["runs"]
    assert len(runs) == 20
    assert sum(min(r["entropy"]) < 0.5 * r["entropy"][0] for r in runs) >= 15
    learned = [r for r in runs if r["held_out"]["valid_seen"] - r["before"]["valid_seen"] >= 0.2]
    assert len(learned) >= 15 and not any(run_stats(r)["collapsed"] for r in learned)


def _results(baselines=None) -> dict:
    meta = {"command": "python -m research.study", "date": "d", "machine": "m", "jobs": 1, "runs": len(RUNS),
            "wall_s": 1.0, "seeds": [0, 1, 2, 3], "eval_tasks": 4, "overrides": {"disable_tqdm": True},
            "warm_start": {"steps": 1, "target_success": 0.9, "check_every": 1, "noisy_steps": 0, "noise": 0.5},
            "setting": {"max_steps": 4, "episodes_per_step": 8, "num_generations": 8}, "setting_name": "maze",
            "baseline_k": 4}  # fmt: skip
    return {"meta": meta, "runs": RUNS, "errors": [], "baselines": baselines}


def test_report_reference_rows_shares_and_pairs():
    from research.study import to_markdown

    baselines = {split: {"random": 0.1, "walker": 0.4, "expert": 1.0, "ceiling": 1.0}
                 for split in ("valid_seen", "valid_unseen")}  # fmt: skip
    text = to_markdown(_results(baselines))
    assert "| random | - | 0.100 | 0.100 | - | - | 0.100 | 0.100 |" in text
    assert "| expert (ceiling) | - | 1.000 (1.000) | 1.000 (1.000) | - | - | 1.000 (1.000) | 1.000 (1.000) |" in text
    assert "4 episode(s) per task" in text and "not recorded" not in text
    # means ± t(0.975, 2) s / sqrt(3); gain >= 0.30: GRPO 0 of 3 seeds (gains 0.25, 0.25, 0), EPO-Base 1 (0.5, 0, 0.25)
    assert "| GRPO | 3 | 0.250 ± 0.000 | 0.417 ± 0.359 | 0.167 ± 0.359 | 0/3 (0.00-0.71) |" in text
    assert "| EPO-Base | 3 | 0.250 ± 0.000 | 0.500 ± 0.621 | 0.250 ± 0.621 | 1/3 (0.01-0.91) |" in text
    assert "| EPO (make demo) - GRPO | valid_seen | 3 | +0.200 ± 0.248 | 0: +0.100, 1: +0.200, 2: +0.300 |" in text
    assert "| EPO (make demo) - EPO-Base | valid_seen | 3 |" in text
    assert "- **EPO (make demo) vs GRPO on success** (paired by seed)" in text
    assert "| GRPO | 3 | 0/3 (0.00-0.71) | 0/3 (0.00-0.71) | - |" in text  # diverged, collapsed, collapse step
    old = to_markdown(_results())  # results from before the reference policies: the renderer still works
    assert "| walker | - | not recorded | not recorded | - | - | not recorded | not recorded |" in old
    assert "Reference policies: not recorded." in old


def test_reference_baselines_on_the_held_out_tasks():
    """The study records the reference policies on the first eval_tasks tasks of each held-out split."""
    from research.study import reference_baselines

    script = SimpleNamespace(env="maze", env_kwargs={"size": 4, "task": "trail", "distractors": 0, "num_train": 16})
    result = reference_baselines(script, SimpleNamespace(max_turns=6), eval_tasks=8, k=2)
    assert set(result) == {"valid_seen", "valid_unseen"}
    for b in result.values():
        assert set(b) == {"random", "walker", "expert", "ceiling"}
        # 4x4 trail mazes are 3-4 moves long: the expert wins all in 6 turns; the signs-blind policies far fewer
        assert b["expert"] == b["ceiling"] == 1.0 and b["random"] < b["walker"] < 0.75, b
