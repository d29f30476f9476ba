"""``ptjax report SWEEP_DIR``: the sweep's tables and the paper's plots.

Writes into the sweep directory:
  results.csv     one row per run x eval step (``ptjax.analysis.load_results``)
  runs.csv        one row per run: best step and best dev score (early stopping)
  summary.csv     mean, std, 95% interval, min and max over seeds of each setting's best
                  dev score
  ensemble.csv    each packed job's prompts, their average, the best, the ensemble
  figures/        fig1_size.png (score vs model size per method), fig3a_length.png (score
                  vs prompt length per size), fig3b_init.png (score vs init per size),
                  fig3c_pretraining.png (score vs size per checkpoint) -- each drawn when
                  the sweep varies what it plots
  report.md       the tables and figures in one page

With several tasks, a run's score is its task's dev metric and a setting's score is the
mean over tasks per seed (the SuperGLUE average is a mean of task scores), then the mean
and std over seeds. A figure's bars are the 95% interval over seeds, or, where a point has
fewer than 3 seeds, the seeds' range (min to max); the figure's title says which.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ptjax import analysis, storage

# Fewer seeds than this and the figures draw the seeds' range, not a 95% t-interval: with 2
# seeds t = 12.7, so the demo's intervals ran from -17% to 172% accuracy.
MIN_SEEDS_FOR_CI = 3
# What a size label (size_label: "236K") in a legend counts: run.py's results.json
# "parameters", every leaf of the loaded model's params.
SIZE_LEGEND = "size: the model's parameters, all its\nweights (embeddings too), not the prompt's"


def size_label(parameters) -> str:
    if not np.isfinite(parameters):
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.3g}{unit}"
    return f"{int(parameters)}"


def pretrain_results(path: str) -> dict:
    """results.json of the ``ptjax pretrain`` run whose ``model/`` is ``path``, or {}."""
    p = os.path.join(os.path.dirname(os.path.normpath(path)), "results.json")
    if os.path.basename(os.path.normpath(path)) != "model" or not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


def checkpoint_family(path: str, sentinel: bool = False) -> str:
    """google/t5-xl-lm-adapt -> "LM adapted"; google/t5-v1_1-xl -> "span corruption (T5
    1.1)", or with task.target_sentinel "span corruption + sentinel" (Figure 3c). A
    ``ptjax pretrain`` output (RUN/model) is named by its objective: "span corruption",
    "LM adapted (500 steps)" (the run's own steps: Figure 3d)."""
    done = pretrain_results(path)
    if done.get("objective") == "span_corruption" and done.get("init") == "scratch":
        return "span corruption" + (" + sentinel" if sentinel else "")
    if done.get("objective") == "prefix_lm":
        return f"LM adapted ({done['steps']} steps)" + (" + sentinel" if sentinel else "")
    if "lm-adapt" in path:
        family = "LM adapted"
    elif "v1_1" in path:
        if sentinel:  # the paper's name for this variant
            return "span corruption + sentinel"
        family = "span corruption (T5 1.1)"
    else:
        family = re.sub(r"(small|base|large|xl|xxl)", "", os.path.basename(path)).strip("-_")
        family = family or path
    return family + (" + sentinel" if sentinel else "")


def _task_mean(runs, by):
    """Mean over tasks for each (setting, seed), so a setting's spread is over seeds."""
    cols = [c for c in by if c != "task.name"]
    per_seed = runs.groupby(cols + ["seed"], dropna=False)["best"].mean().reset_index()
    table = per_seed.groupby(cols, dropna=False)["best"].agg(
        ["mean", "std", "count", "min", "max"]).reset_index()
    table["ci95"] = analysis.ci95(table["std"], table["count"])
    return table


def _label(hue, values) -> str:
    parts = []
    for key, v in zip(hue, values if isinstance(values, tuple) else (values,)):
        if key == "parameters":
            parts.append(size_label(v))
        elif key in ("method.name", "family"):
            parts.append(str(v))
        else:
            parts.append(f"{key.split('.')[-1]}={v}")
    return ", ".join(parts)


def spread(table) -> tuple[str, str]:
    """How a figure shows the spread over seeds of its points (a ``_task_mean`` table):
    ("ci95", ...) where every point has at least MIN_SEEDS_FOR_CI seeds, else ("range",
    ...), the seeds' min to max; the second item says so in the figure's title."""
    lo, hi = int(table["count"].min()), int(table["count"].max())
    seeds = f"{lo}" if lo == hi else f"{lo}-{hi}"
    if lo >= MIN_SEEDS_FOR_CI:
        return "ci95", f"mean of {seeds} seeds; bars: 95% interval (Student's t)"
    if hi == 1:
        return "range", "1 seed: no interval"
    return "range", (f"mean of {seeds} seeds; bars: their range (min to max), "
                     "too few for a 95% interval")


def _plot(ax, table, x, hue, xlabel, bars="ci95", logx=False, categorical=False):
    """One line per value of the ``hue`` columns: the mean over seeds, with bars of the
    95% interval (``bars`` "ci95") or of the seeds' range ("range")."""
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415 (after the backend choice)
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415 (after the backend choice)

    categories = sorted(table[x].unique(), key=str)
    for values, group in table.groupby(hue, dropna=False, sort=True):
        group = group.sort_values(x)
        xs = [categories.index(v) for v in group[x]] if categorical else group[x]
        yerr = (group["ci95"].fillna(0.0) if bars == "ci95" else
                [group["mean"] - group["min"], group["max"] - group["mean"]])
        ax.errorbar(xs, group["mean"], yerr=yerr, marker="o", capsize=3,
                    label=_label(hue, values))
    if categorical:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=15)
    elif logx:
        ax.set_xscale("log")
        ticks = sorted(table[x].unique())
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter() if x != "parameters" else
                                     matplotlib_func(size_label))
        ax.xaxis.set_minor_formatter(NullFormatter())
        close = any(b / a < 1.8 for a, b in zip(ticks, ticks[1:]) if a > 0)
        if close or len(ticks) > 5:  # e.g. lengths 100 and 150 on a log axis
            ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def matplotlib_func(fn):
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415 (after the backend choice)

    return FuncFormatter(lambda v, _: fn(v))


def run_facts(directory: str) -> dict:
    """What the runs of a sweep (or one run) directory were: {"models", "tasks", "steps",
    "majority": {task: majority-class dev accuracy}} from their results.json files."""
    facts = {"models": set(), "tasks": set(), "steps": set(), "majority": {}}
    jobs = os.path.join(directory, "jobs")
    paths = [os.path.join(jobs, j, "results.json")
             for j in (storage.listdir(jobs) if storage.isdir(jobs) else [])]
    paths.append(os.path.join(directory, "results.json"))
    for path in paths:
        if not storage.isfile(path):
            continue
        r = json.loads(storage.read_text(path))
        model = str(r.get("model", "?")).rstrip("/")
        if os.path.basename(model) == "model":  # a ptjax pretrain output: RUN/model
            model = os.path.dirname(model)
        facts["models"].add(os.path.basename(model))
        facts["tasks"].add(r.get("task", "?"))
        facts["steps"].add(r.get("steps"))
        if r.get("majority") is not None:
            facts["majority"][r.get("task", "?")] = r["majority"]
    return facts


def describe_facts(facts: dict) -> str:
    """"tiny-t5 on synthetic_sentiment, 200 steps" for a figure's subtitle."""
    steps = sorted(s for s in facts["steps"] if s is not None)
    models = sorted(facts["models"])
    named = ", ".join(models) if len(models) <= 3 else f"{len(models)} models"
    return (named + " on " + ", ".join(sorted(facts["tasks"]))
            + (f", {'/'.join(str(s) for s in steps)} steps" if steps else ""))


def figures(runs, out_dir: str, metric_name: str, facts: dict | None = None) -> list[str]:
    """The paper's plots for whatever the sweep varies; returns the files written. Other
    settings the sweep varies (besides the task and the seed) get their own lines. facts
    (``run_facts``): models, task and steps in each subtitle, the majority-class baseline
    as a dashed line when every task has one."""
    import matplotlib  # noqa: PLC0415 (backend chosen here)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend choice)

    sentinel = (runs["task.target_sentinel"].fillna(False) if "task.target_sentinel" in runs
                else [False] * len(runs))
    runs = runs.assign(family=[checkpoint_family(p, bool(s))
                               for p, s in zip(runs["model.path"], sentinel)])
    varies = {c: runs[c].nunique(dropna=False) > 1 for c in runs.columns}
    settings = [c for c in analysis.setting_columns(runs) if varies.get(c)
                and c not in ("task.name", "model.path", "task.target_sentinel")]
    if "method.name" in settings:  # settings zipped with the method (its own optimizer...)
        by_method = runs.groupby("method.name", dropna=False)
        settings = [c for c in settings if c == "method.name"
                    or by_method[c].nunique(dropna=False).max() > 1]
    written = []

    def draw(name, title, x, hue, xlabel, **kw):
        hue = hue + [c for c in settings if c not in (x, *hue)]
        table = _task_mean(runs, ["task.name", x, *hue])
        bars, caption = spread(table)
        fig, ax = plt.subplots(figsize=(8.0, 4.0))
        _plot(ax, table, x, hue, xlabel, bars, **kw)
        tasks = sorted(runs["task.name"].unique())
        majority = (facts or {}).get("majority", {})
        if tasks and all(t in majority for t in tasks):
            ax.axhline(float(np.mean([majority[t] for t in tasks])), color="gray",
                       linestyle="--", linewidth=1, label="majority class")
        # beside the axes, not over the lines: a size legend's title takes two lines
        ax.legend(fontsize=7, title=SIZE_LEGEND if "parameters" in hue else None,
                  title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        low, high = ax.get_ylim()
        if table["mean"].between(0, 100).all():  # percentages: no bar reaches past 0 or 100
            ax.set_ylim(max(low, 0.0), min(high, 100.0))
        ax.set_ylabel(f"dev {metric_name} (%, mean over seeds)")
        ax.set_title(title + (f"\n{describe_facts(facts)}" if facts else "") + f"\n{caption}",
                     fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if varies.get("model.path") or varies.get("method.name"):
        draw("fig1_size.png", "Figure 1: score vs model size", "parameters",
             ["method.name"] + ["family"] * bool(varies.get("family")),
             "frozen model parameters (log scale)",
             logx=True)
    # a length that only follows the method (e.g. prefix tuning's own length in a Figure 1
    # sweep) is no length ablation
    per_method = (runs.groupby("method.name")["prompt.length"].nunique().max()
                  if "method.name" in runs and "prompt.length" in runs else 2)
    if varies.get("prompt.length") and per_method > 1:
        draw("fig3a_length.png", "Figure 3a: prompt length", "prompt.length", ["parameters"],
             "prompt length (tokens, log scale)", logx=True)
    if varies.get("prompt.init"):
        draw("fig3b_init.png", "Figure 3b: prompt initialisation", "prompt.init",
             ["parameters"], "prompt initialisation", categorical=True)
    if varies.get("family"):
        draw("fig3c_pretraining.png", "Figure 3c: pre-training objective", "parameters",
             ["family"], "frozen model parameters (log scale)", logx=True)
    return written


FIGURES = ("fig1_size.png", "fig3a_length.png", "fig3b_init.png", "fig3c_pretraining.png")
SCORES = ("mean", "std", "ci95", "min", "max", "best", "average", "ensemble",
          "best_step_mean")


def _markdown(df, floatfmt="{:.2f}") -> str:
    """Scores with ``floatfmt``; settings (learning rates...) as Python writes them."""
    if df.empty:
        return "(none)\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [(floatfmt if c in SCORES or str(c).startswith(("prompt_", "transfer:"))
                  else "{:g}").format(v) if isinstance(v, (float, np.floating)) else str(v)
                 for c, v in zip(cols, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(directory: str) -> dict:
    """Write the tables, figures and report.md (a local directory or a URL: each file one
    object, the figures drawn locally and copied up); returns {name: path}."""
    results = analysis.load_results(directory)
    runs = analysis.load_runs(directory)
    paths = {}
    storage.write_text(p := os.path.join(directory, "results.csv"), results.to_csv(index=False))
    paths["results"] = p
    if runs.empty:
        return paths
    storage.write_text(p := os.path.join(directory, "runs.csv"), runs.to_csv(index=False))
    paths["runs"] = p
    summary = analysis.summarize(runs)
    storage.write_text(p := os.path.join(directory, "summary.csv"), summary.to_csv(index=False))
    paths["summary"] = p
    ensembles = analysis.load_ensembles(directory)
    if not ensembles.empty:
        storage.write_text(p := os.path.join(directory, "ensemble.csv"),
                           ensembles.to_csv(index=False))
        paths["ensemble"] = p
    fig_dir = os.path.join(directory, "figures")
    storage.makedirs(fig_dir)
    for name in FIGURES:  # a figure the sweep no longer calls for is not left behind
        if storage.exists(p := os.path.join(fig_dir, name)):
            storage.remove(p)
    metric = ", ".join(sorted(runs["metric"].dropna().unique())) or "score"
    facts = run_facts(directory)
    with storage.staged_dir(fig_dir) as local:
        drawn = figures(runs, local, metric, facts)
    paths["figures"] = [os.path.join(fig_dir, os.path.basename(f)) for f in drawn]
    transfer = [c for c in runs.columns if c.startswith("transfer:")]
    baseline = ("; majority-class baseline " + ", ".join(
        f"{v:.2f} ({t})" for t, v in sorted(facts["majority"].items()))
        if facts["majority"] else "")
    lines = [f"# Sweep report: {os.path.basename(os.path.normpath(directory))}", "",
             f"{len(runs)} runs of {describe_facts(facts)}; dev metric: {metric}"
             f"{baseline}; best step by early stopping on dev.",
             "", "## Mean, std, 95% interval (ci95: half-width), min and max over seeds",
             "", _markdown(summary)]
    few = int(summary["seeds"].min())
    if few < MIN_SEEDS_FOR_CI:
        which = "per setting" if summary["seeds"].max() == few else "for some settings"
        lines += [f"With {few} seed{'s' * (few > 1)} {which}, ci95 "
                  + ("is a Student's t interval with 1 degree of freedom, 12.7 x std / "
                     "sqrt(2): about 9 standard deviations each side" if few == 2
                     else "is undefined (NaN)")
                  + ". The figures draw the seeds' range (min to max) instead; run "
                  f"{MIN_SEEDS_FOR_CI} or more seeds for 95% intervals.", ""]
    if transfer:
        cols = [c for c in analysis.setting_columns(runs) if runs[c].nunique() > 1]
        t = runs.groupby(cols or ["task.name"], dropna=False)[["best", *transfer]].mean()
        lines += ["## Zero-shot transfer (best prompt of each run)", "",
                  _markdown(t.reset_index())]
    if not ensembles.empty:
        show = ensembles[[c for c in ("model.path", "task.name", "method.name",
                                      "prompt.length")
                          if ensembles[c].nunique() > 1 or c == "task.name"]
                         + ["metric", "prompts", "average", "best", "ensemble"]]
        lines += ["## Prompt ensembles", "", _markdown(show)]
    size = size_label(runs["parameters"].max())
    lines += ["## Figures", "",
              "Each point is the mean over seeds (of the mean over tasks); each figure's "
              "title says what its bars are."
              + (f" Sizes such as {size} count the model's parameters: all its weights, "
                 "embeddings too, not the prompt's." if size != "?" else ""), ""]
    lines += [f"![{os.path.basename(f)}](figures/{os.path.basename(f)})"
              for f in paths["figures"]]
    storage.write_text(p := os.path.join(directory, "report.md"), "\n".join(lines) + "\n")
    paths["report"] = p
    return paths
