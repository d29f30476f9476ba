"""The local lab, end to end and resumable: pre-train the size ladder, then run the
paper's experiments in miniature on it, then write the report.

    python experiments/lab/lab.py pretrain     # 4 sizes x (span corruption, LM adaptation)
    python experiments/lab/lab.py sweeps       # the sweeps (each ends with ptjax report)
    python experiments/lab/lab.py report       # the probe + experiments/lab/results/
                                               # (REPORT.md, figures/, tables/ as CSV)
    python experiments/lab/lab.py all          # pretrain, the sweeps, the report
    python experiments/lab/lab.py all --sizes xs,s,m   # a subset (the ~2 CPU-hour lab)
    python experiments/lab/lab.py all --smoke  # the CI smoke: smallest size, a few steps

Every stage is a ``ptjax pretrain`` / ``ptjax sweep`` command (printed before it runs);
kill this script at any point and rerun it: finished runs are skipped, a killed one
resumes from its last checkpoint. Outputs go under ``--root`` (default runs/lab; a subset
of sizes: runs/lab-SIZES; the smoke: runs/lab-smoke).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import yaml

from ptjax.report import checkpoint_family, pretrain_results, size_label

HERE = os.path.dirname(os.path.abspath(__file__))

# T5 v1.1-style (gated GELU, untied head, no dropout in pre-training); one 4,000-id
# tokenizer for all, so the ladder spans 35x in parameters (embeddings included, as T5's
# sizes count them): 0.13 M, 0.71 M, 1.8 M, 4.6 M. Sizes chosen to fit the CPU budget.
SIZES = {
    "xs": {"d_model": 16, "d_kv": 8, "num_heads": 2, "d_ff": 32, "num_layers": 1},
    "s": {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2},
    "m": {"d_model": 128, "d_kv": 32, "num_heads": 4, "d_ff": 256, "num_layers": 2},
    "l": {"d_model": 192, "d_kv": 32, "num_heads": 6, "d_ff": 512, "num_layers": 3},
}
COMMON = {"pretrain.vocab_size": 4000, "pretrain.input_length": 64,
          "train.batch_size": 32, "train.checkpoint_every": 250, "train.log_every": 50}
SPAN_STEPS = 1500  # ~3.7 passes over the 1.26 M train tokens
LM_ADAPT_STEPS = (100, 500)  # the paper's Figure 3d in miniature (it used up to 100K)
SMOKE = {"sizes": ("xs",), "span_steps": 8, "lm_adapt_steps": (2, 4),
         "sweeps": ("fig1.yaml", "fig3cd_pretraining.yaml"),
         "extra": {"pretrain.documents": 40, "pretrain.vocab_size": 600,
                   "pretrain.eval_examples": 16, "train.batch_size": 8,
                   "train.checkpoint_every": 4, "train.log_every": 4}}


def sh(cmd: list[str]) -> None:
    """Run one command (printed first), failing the lab if it fails. ``ptjax`` is this
    Python's own (the venv's, activated or not)."""
    print("+ " + " ".join(_quote(c) for c in cmd), flush=True)
    t0 = time.time()
    if cmd[0] == "ptjax":
        cmd = [sys.executable, "-m", "ptjax.cli", *cmd[1:]]
    subprocess.run(cmd, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _quote(s: str) -> str:
    return f"'{s}'" if any(c in s for c in " {}[]") else s


def _overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def span_dir(root, size):
    return os.path.join(root, "pretrain", f"span-{size}")


def lm_dir(root, size, steps):
    return os.path.join(root, "pretrain", f"lm{steps}-{size}")


def pretrain(root: str, sizes, span_steps: int, lm_steps, extra: dict) -> None:
    """Span corruption from scratch for every size, then LM adaptation continued from it
    (each longer LM-adaptation run continues a copy of the shorter one)."""
    tok = {"pretrain.tokenizer_dir": os.path.join(root, "tokenizers")}
    for size in sizes:
        arch = {f"pretrain.{k}": v for k, v in SIZES[size].items()}
        run = span_dir(root, size)
        if not os.path.exists(os.path.join(run, "results.json")):
            sh(["ptjax", "pretrain", os.path.join(HERE, "pretrain_span.yaml"),
                f"run_dir={run}", f"train.steps={span_steps}", "--no-progress",
                *_overrides({**COMMON, **tok, **arch, **extra})])
        prev = None
        for steps in lm_steps:
            run = lm_dir(root, size, steps)
            if not os.path.exists(os.path.join(run, "results.json")):
                if prev and not os.path.exists(run):
                    shutil.copytree(prev, run)  # a copied run continues in place
                    for name in ("results.json", "model"):
                        p = os.path.join(run, name)
                        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                sh(["ptjax", "pretrain", os.path.join(HERE, "lm_adapt.yaml"),
                    f"run_dir={run}", f"pretrain.init={span_dir(root, size)}/model",
                    f"train.steps={steps}", "--no-progress",
                    *_overrides({**COMMON, **tok, **extra})])
            prev = run


SWEEPS = ("fig1.yaml", "fig3cd_pretraining.yaml", "fig3b_init.yaml", "fig3a_length.yaml")
# Beyond the paper's figures, run on their own (``ptjax sweep experiments/lab/NAME``) and
# reported when they have run.
DIAGNOSTICS = ("long_tuning.yaml",)
SMOKE_SWEEP = {"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 4,
               "train.log_every": 2, "task.dev_size": 16, "prompt.vocab_limit": 500}


def cut_sweep(name: str, root: str, sizes, smoke: bool = False) -> str:
    """The sweep file ``name`` cut to ``sizes``, its paths moved under ``root``; with
    ``smoke`` also cut to 2 seeds, one task and a few steps. Written to ROOT/sweeps/NAME
    and returned (a cut sweep has its own root: a sweep directory holds one sweep)."""
    with open(os.path.join(HERE, name)) as f:
        data = yaml.safe_load(f)
    lm = ({f"lm{a}-": f"lm{b}-" for a, b in zip(LM_ADAPT_STEPS, SMOKE["lm_adapt_steps"])}
          if smoke else {})

    def path(p):
        for a, b in lm.items():
            p = p.replace(a, b)
        return p.replace("runs/lab/", root.rstrip("/") + "/")

    def keep(p):
        return any(f"-{s}/" in p for s in sizes)

    for group in ([data["grid"]] if "grid" in data else []):
        if "model.path" in group:
            group["model.path"] = [path(p) for p in group["model.path"] if keep(p)]
    zips = data.get("zip", {})
    for group in (zips if isinstance(zips, list) else [zips]):
        if "model.path" in group:
            idx = [i for i, p in enumerate(group["model.path"]) if keep(p)]
            for k in group:
                group[k] = [group[k][i] for i in idx]
            group["model.path"] = [path(p) for p in group["model.path"]]
    data["base"] = os.path.join(HERE, data["base"])
    data["dir"] = path(data["dir"])
    if smoke:
        data["config"] = {**data.get("config", {}), **SMOKE_SWEEP}
        data["seeds"] = data["seeds"][:2]
        if "task.name" in data.get("grid", {}):
            data["grid"]["task.name"] = data["grid"]["task.name"][:1]
    out = os.path.join(root, "sweeps", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return out


def sweeps(root: str, sizes, smoke: bool, canonical: bool) -> None:
    """Every lab sweep (finished jobs skipped, killed ones resumed), each ending with its
    ``ptjax report``. The canonical lab (all sizes in runs/lab) runs the files as they are;
    a smoke, a subset of sizes or another root runs them cut (``cut_sweep``)."""
    for name in SWEEPS:
        if smoke and name not in SMOKE["sweeps"]:
            continue
        path = os.path.join(HERE, name) if canonical else cut_sweep(name, root, sizes, smoke)
        sh(["ptjax", "sweep", path, "--no-progress"])


def _table(df, cols, fmt="{:.1f}") -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df[cols].iterrows():
        lines.append("| " + " | ".join(fmt.format(v) if isinstance(v, float) else str(v)
                                         for v in row) + " |")
    return "\n".join(lines) + "\n"


def _setting_axis(df) -> str:
    """The column a sweep's table spreads across (method, checkpoint, init, length), made
    (as column "setting") from several where one alone repeats within a size, e.g. one
    method at two learning rates; adds "checkpoint" (the pre-training family)."""
    if "model.path" in df:
        sentinel = df.get("task.target_sentinel", [False] * len(df))
        df["checkpoint"] = [checkpoint_family(p, str(s) == "True")
                            for p, s in zip(df["model.path"], sentinel)]
    axis = next(c for c in ("method.name", "checkpoint", "prompt.init", "prompt.length",
                            "parameters") if c in df and df[c].nunique() > 1)
    rows = [c for c in ("task.name", "parameters", "seed") if c in df]  # seed: runs.csv
    if df.duplicated(rows + [axis]).any():
        extra = [c for c in ("optim.learning_rate", "train.steps", "prompt.length")
                 if c in df and c != axis and df[c].nunique() > 1]
        df["setting"] = [", ".join([str(r[axis])] + [f"{c.split('.')[-1]} {r[c]:g}"
                                                      for c in extra])
                         for _, r in df.iterrows()]
        axis = "setting"
    return axis


def _last_train_losses(job_dir: str) -> dict:
    """{member k: its last logged train loss} of a job (empty: never trained)."""
    losses = {}
    path = os.path.join(job_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("split") == "train":
                    losses[r.get("prompt", 0)] = r["loss"]
    return losses


def _train_losses(d: str):
    """The sweep's runs.csv with ``loss``, each run's last logged train loss (runs that
    never logged one dropped), or None without runs.csv."""
    path = os.path.join(d, "runs.csv")
    if not os.path.exists(path):
        return None
    df = pd.read_csv(path)
    jobs = {j: _last_train_losses(os.path.join(d, "jobs", j)) for j in set(df["job"])}
    df["loss"] = [jobs[j].get(k, float("nan")) for j, k in zip(df["job"], df["prompt"])]
    return df[df["loss"] == df["loss"]].reset_index(drop=True)


def _loss_tables(df) -> list[str]:
    """Report lines: each setting's train loss at its last logged step (``_train_losses``),
    mean over seeds. Accuracy at chance can hide a fit that differs (e.g. with prompt
    length)."""
    if df is None or df.empty:
        return []
    df = df.copy()
    axis = _setting_axis(df)
    note = ("; the sentinel variant's targets carry one more, easy, token, so its loss is "
            "not comparable" if "task.target_sentinel" in df else "")
    lines = ["", "Train loss at the last logged step (nats per target token, the mean of the "
             f"last logging window, mean over seeds{note}):"]
    for task, part in df.groupby("task.name") if "task.name" in df else [("", df)]:
        table = part.pivot_table(index="parameters", columns=axis, values="loss",
                                 aggfunc="mean").reset_index()
        table["parameters"] = [size_label(p) for p in table["parameters"]]
        table.columns = [str(c) for c in table.columns]
        lines += ["", f"**{task}**" if task else "", "",
                  _table(table, list(table.columns), "{:.2f}")]
    return lines


def report(root: str, out: str) -> str:
    """OUT/REPORT.md: the pre-training table, the probe and every finished sweep's
    per-setting mean and 95% interval over seeds (figures copied into OUT/figures), and
    the tables it is made from as CSV in OUT/tables (``ptjax.analysis.load_tables``):
    pretraining.csv, probe.csv, and per sweep NAME-summary.csv, NAME-ensemble.csv and
    NAME-train_loss.csv (NAME: the sweep file's, e.g. fig1)."""
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    tables = os.path.join(out, "tables")
    os.makedirs(tables, exist_ok=True)
    for old in glob.glob(os.path.join(tables, "*.csv")):  # none left from runs since removed
        os.remove(old)
    lines = ["# The lab's results", "",
             f"Generated by `python experiments/lab/lab.py report` from `{root}`; what they "
             "mean: README.md here. The tables as CSV: `tables/` "
             "(`ptjax.analysis.load_tables`).", ""]
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "pretrain", "*", "results.json"))):
        with open(path) as f:
            r = json.load(f)
        rows.append({"run": os.path.basename(os.path.dirname(path)), "model": r["model"],
                     "parameters": r["parameters"],
                     "objective": checkpoint_family(r["model"]), "steps": r["steps"],
                     "validation_loss": r["validation_loss"]})
    if rows:
        df = pd.DataFrame(rows)
        df.to_csv(os.path.join(tables, "pretraining.csv"), index=False)
        df["parameters"] = [size_label(p) for p in df["parameters"]]
        df = df.rename(columns={"validation_loss": "validation loss"})
        lines += ["## Pre-training", "", "Validation loss: nats per target token on the "
                  "held-out scenes (each objective its own targets, so compare within one).",
                  "", _table(df, ["run", "parameters", "objective", "steps",
                                  "validation loss"], "{:.3f}")]
    probe_csv = os.path.join(root, "probe.csv")
    if os.path.exists(probe_csv):
        shutil.copyfile(probe_csv, os.path.join(tables, "probe.csv"))
        df = pd.read_csv(probe_csv)
        df["parameters"] = [size_label(p) for p in df["parameters"]]
        df["checkpoint"] = [checkpoint_family(p) for p in df["checkpoint"]]
        df["95% CI"] = [f"{a:.1f}-{b:.1f}" for a, b in zip(df["ci95_low"], df["ci95_high"])]
        lines += ["## Probe: real line vs the same line shuffled (no training)", "",
                  "`python experiments/lab/probe.py`: share of 150 held-out pairs where the "
                  "real line is the more likely decoder target after an empty input.", "",
                  _table(df, ["parameters", "checkpoint", "real_more_likely", "95% CI",
                              "nll_per_token"])]
    for name in SWEEPS + DIAGNOSTICS:
        d = os.path.join(root, name.split("_")[0].replace(".yaml", ""))
        summary = os.path.join(d, "summary.csv")
        if not os.path.exists(summary):
            continue
        shutil.copyfile(summary, os.path.join(tables, f"{name[:-5]}-summary.csv"))
        df = pd.read_csv(summary)
        axis = _setting_axis(df)
        df["cell"] = [f"{m:.1f} ± {c:.1f}" if c == c else f"{m:.1f}"
                      for m, c in zip(df["mean"], df["ci95"])]
        lines += [f"## {name[:-5]}", "", f"`{d}/summary.csv`: dev accuracy (%) of each "
                  "setting's best step, mean over seeds ± the 95% interval's half-width "
                  f"(Student's t; {int(df['seeds'].min())}-{int(df['seeds'].max())} seeds)."]
        for task, part in df.groupby("task.name") if "task.name" in df else [("", df)]:
            table = part.pivot_table(index="parameters", columns=axis, values="cell",
                                     aggfunc="first").reset_index().fillna("(not run)")
            table["parameters"] = [size_label(p) for p in table["parameters"]]
            table.columns = [str(c) for c in table.columns]  # prompt lengths are numbers
            lines += ["", f"**{task}**" if task else "", "", _table(table, list(table.columns))]
        losses = _train_losses(d)
        if losses is not None and not losses.empty:
            losses.to_csv(os.path.join(tables, f"{name[:-5]}-train_loss.csv"), index=False)
        lines += _loss_tables(losses)
        ens = os.path.join(d, "ensemble.csv")
        if os.path.exists(ens):
            shutil.copyfile(ens, os.path.join(tables, f"{name[:-5]}-ensemble.csv"))
            e = pd.read_csv(ens)
            e = e[e["metric"] == "accuracy"]
            e["parameters"] = [size_label(pretrain_results(p)["parameters"])
                               for p in e["model.path"]]
            lines += ["Each job's 5 prompts as one majority-vote ensemble (accuracy):", "",
                      _table(e, ["parameters", "task.name", "method.name", "average", "best",
                                 "ensemble"])]
        for fig in sorted(glob.glob(os.path.join(d, "figures", "*.png"))):
            dest = f"{name[:-5]}-{os.path.basename(fig)}"
            shutil.copyfile(fig, os.path.join(out, "figures", dest))
            lines += [f"![{dest}](figures/{dest})", ""]
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("pretrain", "sweeps", "report", "all"))
    p.add_argument("--sizes", default=",".join(SIZES),
                   help=f"comma-separated sizes to run, of {','.join(SIZES)} (default all; "
                        "a subset runs under its own root, runs/lab-SIZES)")
    p.add_argument("--out", default=None,
                   help="report directory (default experiments/lab/results for the full "
                        "lab, else ROOT)")
    p.add_argument("--root", default=None,
                   help="output root (default runs/lab; runs/lab-SIZES for a subset)")
    p.add_argument("--smoke", action="store_true", help="CI-sized: smallest size, few steps")
    a = p.parse_args(argv)
    sizes = tuple(s for s in a.sizes.split(",") if s)
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        p.error(f"--sizes {a.sizes!r}: unknown size {bad[0] if bad else ''!r}; "
                f"valid: {', '.join(SIZES)}")
    sizes = tuple(s for s in SIZES if s in sizes)  # the ladder's order
    if a.smoke:
        if sizes != tuple(SIZES):
            p.error("--smoke runs the smallest size; drop --sizes")
        sizes = SMOKE["sizes"]
    whole = sizes == tuple(SIZES) and not a.smoke
    root = a.root or ("runs/lab-smoke" if a.smoke else
                      "runs/lab" if whole else "runs/lab-" + "-".join(sizes))
    canonical = whole and root == "runs/lab"  # what the sweep files and results/ describe
    if a.stage in ("pretrain", "all"):
        if a.smoke:
            pretrain(root, sizes, SMOKE["span_steps"], SMOKE["lm_adapt_steps"],
                     SMOKE["extra"])
        else:
            pretrain(root, sizes, SPAN_STEPS, LM_ADAPT_STEPS, {})
    if a.stage in ("sweeps", "all"):
        sweeps(root, sizes, a.smoke, canonical)
    if a.stage in ("report", "all"):
        if not a.smoke:
            sh([sys.executable, os.path.join(HERE, "probe.py"),
                *sorted(glob.glob(os.path.join(root, "pretrain", "*", "model"))),
                "--out", os.path.join(root, "probe.csv")])
        report(root, a.out or (os.path.join(HERE, "results") if canonical else root))


if __name__ == "__main__":
    sys.exit(main())
