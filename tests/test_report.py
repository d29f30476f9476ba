"""The report's figures and report.md read as a new user reads them: percentage axes stop
at 0 and 100, with fewer than 3 seeds the bars are the seeds' range (and the figure and
report.md say so), and a legend of model sizes says what "236K" counts."""
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ptjax import analysis, report
from ptjax.config import from_dict, save_config

TINY = 236128  # parameters, as results.json gives them: "236K" in a legend


def _runs(seeds, scores):
    """Runs of a prompt-length sweep on one model: scores[length] gives each seed's best."""
    return pd.DataFrame([{"model.path": "tiny-t5", "task.name": "synthetic_sentiment",
                          "method.name": "prompt", "prompt.length": length,
                          "parameters": TINY, "seed": seed, "best": score, "best_step": 50}
                         for length, per_seed in scores.items()
                         for seed, score in zip(seeds, per_seed)])


@pytest.fixture
def drawn(monkeypatch):
    """The figures ``report.figures`` draws, kept open to read them."""
    close, closed = plt.close, []
    monkeypatch.setattr(plt, "close", closed.append)
    yield closed
    for fig in closed:
        close(fig)


def _bars(ax):
    """[(low, high)] of every error bar drawn on ``ax``, line by line."""
    out = []
    for container in ax.containers:
        segments = container.lines[2][0].get_segments()
        out += [(float(s[0][1]), float(s[1][1])) for s in segments]
    return out


def test_percentage_axes_stop_at_0_and_100(tmp_path, drawn):
    # 3 seeds that disagree widely: the 95% interval (t = 4.3) spans far past 0 and 100
    runs = _runs([0, 1, 2], {2: [20.0, 60.0, 95.0], 20: [10.0, 50.0, 99.0]})
    report.figures(runs, str(tmp_path), "accuracy")
    (fig,) = drawn
    low, high = fig.axes[0].get_ylim()
    assert 0.0 <= low and high <= 100.0
    assert min(b[0] for b in _bars(fig.axes[0])) < 0  # the bars do reach past: clipped


def test_two_seeds_draw_their_range_and_say_so(tmp_path, drawn):
    runs = _runs([0, 1], {2: [56.0, 78.0], 20: [60.0, 70.0]})
    report.figures(runs, str(tmp_path), "accuracy")
    ax = drawn[0].axes[0]
    assert sorted(_bars(ax)) == [(56.0, 78.0), (60.0, 70.0)]  # min to max, not 12.7 x se
    assert ax.get_ylim()[0] > 50 and ax.get_ylim()[1] < 85  # the data fill the axis
    assert ax.get_title().splitlines()[-1] == (
        "mean of 2 seeds; bars: their range (min to max), too few for a 95% interval")
    # 3 seeds or more: the 95% interval, and the title says that instead
    runs = _runs([0, 1, 2], {2: [56.0, 78.0, 60.0], 20: [60.0, 70.0, 65.0]})
    report.figures(runs, str(tmp_path), "accuracy")
    ax = drawn[1].axes[0]
    summary = analysis.summarize(runs).set_index("prompt.length")
    for (low, high), length in zip(_bars(ax), (2, 20)):
        np.testing.assert_allclose([low, high], summary.loc[length, "mean"]
                                   + np.array([-1, 1]) * summary.loc[length, "ci95"])
    assert ax.get_title().splitlines()[-1] == ("mean of 3 seeds; bars: 95% interval "
                                               "(Student's t)")


def test_size_legend_says_what_the_count_counts(tmp_path, drawn):
    # two sizes x two lengths: Figure 3a, one line per size, labelled by size_label
    runs = pd.concat([_runs([0, 1], {2: [56.0, 60.0], 20: [70.0, 72.0]}),
                      _runs([0, 1], {2: [66.0, 60.0], 20: [80.0, 72.0]}).assign(
                          **{"model.path": "other", "parameters": 1_812_224})])
    written = report.figures(runs, str(tmp_path), "accuracy")
    fig3a = drawn[[os.path.basename(w) for w in written].index("fig3a_length.png")]
    legend = fig3a.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["236K", "1.81M"]
    # results.json's "parameters": every leaf of the loaded model's params (run.py)
    assert legend.get_title().get_text() == ("size: the model's parameters, all its\n"
                                             "weights (embeddings too), not the prompt's")


def _fake_sweep(directory, seeds=(0, 1)):
    """A finished prompt-length sweep's files as ``ptjax sweep`` writes them (one run per
    job), without training: sweep.json, and per job config.yaml, metrics.jsonl and
    results.json."""
    runs = []
    for length in (2, 20):
        for seed in seeds:
            job = f"len{length}-seed{seed}"
            d = os.path.join(directory, "jobs", job)
            os.makedirs(d)
            save_config(from_dict({"model": {"path": "tiny-t5"},
                                   "task": {"name": "synthetic_sentiment"},
                                   "prompt": {"length": length, "seeds": [seed]}}),
                        os.path.join(d, "config.yaml"))
            with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                for step in (50, 100):
                    f.write(json.dumps({"step": step, "split": "validation", "prompt": 0,
                                        "accuracy": 50.0 + length + 10 * seed + step / 50})
                            + "\n")
            with open(os.path.join(d, "results.json"), "w") as f:
                json.dump({"metric": "accuracy", "parameters": TINY, "model": "tiny-t5",
                           "task": "synthetic_sentiment", "steps": 100, "majority": 55.5}, f)
            runs.append({"run": job, "job": job, "prompt": 0,
                         "settings": {"prompt.length": length, "seed": seed}})
    with open(os.path.join(directory, "sweep.json"), "w") as f:
        json.dump({"name": "fake", "keys": ["prompt.length", "seed"], "runs": runs}, f)
    return str(directory)


def test_report_md_and_summary_say_what_the_bars_are(tmp_path):
    d = _fake_sweep(tmp_path / "two")
    report.write_report(d)
    summary = pd.read_csv(os.path.join(d, "summary.csv")).set_index("prompt.length")
    # best of each run: 50 + length + 10 x seed + 2 (step 100)
    assert summary.loc[2, ["min", "max"]].tolist() == [54.0, 64.0]
    assert summary.loc[20, ["min", "max"]].tolist() == [72.0, 82.0]
    text = open(os.path.join(d, "report.md")).read()
    assert "| min | max |" in text and "| 54.00 | 64.00 |" in text
    assert ("With 2 seeds per setting, ci95 is a Student's t interval with 1 degree of "
            "freedom, 12.7 x std / sqrt(2): about 9 standard deviations each side. The "
            "figures draw the seeds' range (min to max) instead") in text
    assert ("Sizes such as 236K count the model's parameters: all its weights, embeddings "
            "too, not the prompt's.") in text
    # 3 seeds: intervals, and no such note
    d = _fake_sweep(tmp_path / "three", seeds=(0, 1, 2))
    report.write_report(d)
    text = open(os.path.join(d, "report.md")).read()
    assert "seeds' range" not in text and "Sizes such as 236K" in text
