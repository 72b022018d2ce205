"""`epo_trl.cli.plots.write_run_plots`: which PNGs a log history produces, and the no-matplotlib path."""

from pathlib import Path

import pytest

from epo_trl.cli import plots

PNG = b"\x89PNG\r\n\x1a\n"


def history(steps=4, turns=3):
    out = []
    for s in range(1, steps + 1):
        entry = {"step": s, "rollout/success_rate": s / steps, "rollout/mean_return": 10 * s / steps, "entropy": 1.0}
        entry.update({f"epo/turn_entropy/{t}": 1.0 + t / 10 for t in range(turns)})
        if s > 1:  # no reference before the first step's history
            entry.update({"epo/ref_entropy_mean": 1.1, "epo/entropy_turn_first": 1.0, "epo/entropy_turn_last": 1.2})
        out.append(entry)
    return out + [{"step": steps, "train_runtime": 3.0}]  # Trainer's end-of-training entry has no metrics


def test_series_reads_one_metric_in_order():
    assert plots.series(history(), "epo/ref_entropy_mean") == ([2.0, 3.0, 4.0], [1.1, 1.1, 1.1])


def test_every_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    written = plots.write_run_plots(history(turns=30), str(tmp_path), kappa_low=0.0, kappa_high=2.0)
    names = [p.rsplit("/", 1)[-1] for p in written]
    assert names == ["success_rate.png", "return.png", "turn_entropy.png", "entropy_band.png"]
    assert all(Path(p).read_bytes()[:8] == PNG for p in written)


def test_only_logged_metrics_are_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    grpo_like = [{"step": 1, "rollout/success_rate": 0.5}, {"step": 2, "rollout/success_rate": 0.75}]
    assert [p.rsplit("/", 1)[-1] for p in plots.write_run_plots(grpo_like, str(tmp_path))] == ["success_rate.png"]
    assert plots.write_run_plots([], str(tmp_path / "empty")) == []


def test_without_matplotlib_nothing_is_written_and_it_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(plots, "plots_available", lambda: False)
    assert plots.write_run_plots(history(), str(tmp_path)) == []
    assert 'pip install "epo-trl[plots]"' in caplog.text and not list(tmp_path.iterdir())
