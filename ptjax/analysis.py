"""Results of runs and sweeps as pandas tables, for notebooks and ``ptjax report``.

    import ptjax.analysis as pa
    df = pa.load_results("runs/demo")     # one row per run x eval step
    runs = pa.load_runs("runs/demo")      # one row per run: best step and best dev score
    pa.summarize(runs)                    # mean, std, 95% CI, min, max over seeds per setting
    pa.load_tables("runs/demo")           # every CSV a report wrote: {"summary": ..., ...}

Works on a sweep directory (``ptjax sweep``) and on a single run directory
(``ptjax train``), local or on object storage (``gs://``). Columns: ``run``, ``job``,
``prompt`` (its slot in the job), ``seed``, the swept settings under their config keys
(``prompt.length``, ``model.path``, ...), the standard settings (``model.path``,
``task.name``, ``method.name``, ``prompt.length``, ``prompt.init``), ``parameters`` (of
the frozen model), ``step``, ``metric`` (the name of the dev metric that picks the best
step), ``score`` (its value) and every dev metric.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
# scipy loads scipy.stats on first use (about a second): importing scipy is cheap
import scipy

from ptjax import config as config_lib
from ptjax import methods, storage
from ptjax.errors import PtjaxError
from ptjax.models.named import load_run_model
from ptjax.prompts import input_embedding
from ptjax.sharding import to_host

STANDARD = ("model.path", "task.name", "method.name", "prompt.length", "prompt.init")


def _read_json(path: str):
    return json.loads(storage.read_text(path))


def _metric_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    rows = []
    for line in storage.read_text(path).splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return rows


def _entries(directory: str) -> list[dict]:
    """(run, job, prompt, settings, run_dir, keys) of every run under ``directory``."""
    manifest = os.path.join(directory, "sweep.json")
    if storage.exists(manifest):
        m = _read_json(manifest)
        return [dict(r, run_dir=os.path.join(directory, "jobs", r["job"]), keys=m["keys"],
                     sweep=m["name"]) for r in m["runs"]]
    if storage.exists(os.path.join(directory, "config.yaml")):
        cfg = config_lib.load_config(os.path.join(directory, "config.yaml"))
        name = os.path.basename(os.path.normpath(directory))
        return [{"run": f"{name}/{k}", "job": name, "prompt": k, "settings": {"seed": s},
                 "run_dir": directory, "keys": ["seed"], "sweep": ""}
                for k, s in enumerate(methods.build(cfg, None).seeds)]
    raise PtjaxError(f"{directory}: neither a sweep directory (sweep.json) nor a run "
                     "directory (config.yaml)")


def _settings(entry: dict, cfg, results: dict | None) -> dict:
    k = entry["prompt"]
    out = {"run": entry["run"], "job": entry["job"], "prompt": k}
    for key in STANDARD:
        out[key] = config_lib.get(cfg, key)
    inits = cfg.prompt.inits or (cfg.prompt.init,) * len(cfg.prompt.seeds)
    out["prompt.init"] = inits[k] if k < len(inits) else cfg.prompt.init
    out["seed"] = cfg.prompt.seeds[k] if k < len(cfg.prompt.seeds) else cfg.prompt.seeds[0]
    for key, value in entry["settings"].items():
        if key != "seed":
            key = config_lib.current_key(key)  # sweeps made before a key was renamed
            out[key] = value if not isinstance(value, list) else tuple(value)
    out["parameters"] = (results or {}).get("parameters", np.nan)
    return out


def load_results(directory: str):
    """One row per run x dev evaluation (and per run x transfer task, split
    ``transfer:<task>``, at the run's best step)."""
    rows = []
    for entry in _entries(directory):
        cfg_path = os.path.join(entry["run_dir"], "config.yaml")
        if not storage.exists(cfg_path):
            continue  # a job not started yet
        cfg = config_lib.load_config(cfg_path)
        res_path = os.path.join(entry["run_dir"], "results.json")
        results = _read_json(res_path) if storage.exists(res_path) else None
        base = _settings(entry, cfg, results)
        metric = (results or {}).get("metric")
        for r in _metric_rows(entry["run_dir"]):
            if r.get("split") != "validation" or r.get("prompt") != entry["prompt"]:
                continue
            values = {k: v for k, v in r.items() if k not in ("split", "prompt", "step")
                      and not k.startswith("best_")}
            metric = metric or next((k[5:] for k in r if k.startswith("best_") and
                                     k != "best_step"), None)
            rows.append({**base, "split": "validation", "step": r["step"], "metric": metric,
                         "score": r.get(metric, np.nan), **values})
        for task, values in ((results or {}).get("transfer") or {}).items():
            k = entry["prompt"]
            best = results["prompts"][k]
            flat = {m: v[k] for m, v in values.items()}
            rows.append({**base, "split": f"transfer:{task}", "step": best["best_step"],
                         "metric": results["metric"],
                         "score": flat.get(results["metric"], flat.get("score", np.nan)),
                         **flat})
    columns = ["run", "job", "prompt", "seed", *STANDARD, "parameters", "split", "step",
               "metric", "score"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=columns)
    rest = [c for c in df.columns if c not in columns]
    return df[[c for c in columns if c in df.columns] + rest]


def load_runs(directory: str):
    """One row per run: its settings, ``best_step`` and ``best`` (the dev metric at the
    best step: the paper's early stopping), ``finished``, and transfer scores
    (``transfer:<task>``) at that step."""
    df = load_results(directory)
    if df.empty:
        return pd.DataFrame(columns=["run", "best", "best_step"])
    dev = df[df["split"] == "validation"]
    # best = highest score; ties go to the earliest step (as training keeps it)
    order = dev.sort_values(["run", "score", "step"], ascending=[True, False, True])
    best = order.groupby("run", sort=False).head(1).set_index("run")
    keep = [c for c in df.columns if c not in ("split", "step", "score") and
            c in best.columns]
    out = best[keep].copy()
    out["best"] = best["score"]
    out["best_step"] = best["step"]
    last = dev.groupby("run")["step"].max()
    out["last_step"] = last
    for split, group in df[df["split"].str.startswith("transfer:")].groupby("split"):
        out[split] = group.set_index("run")["score"]
    return out.reset_index()


def setting_columns(runs) -> list[str]:
    """The columns that name a setting: config keys (the seed, ids and results aside)."""
    keys = set(config_lib.all_keys())
    return [c for c in runs.columns if c in keys]


def ci95(std, n):
    """The half-width of the 95% confidence interval of a mean of ``n`` seeds with sample
    standard deviation ``std`` (Student's t, n - 1 degrees of freedom); NaN for n < 2."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = scipy.stats.t.ppf(0.975, np.where(n > 1, n - 1, np.nan))
        return t * np.asarray(std, dtype=float) / np.sqrt(n)


def summarize(runs, by=None, value: str = "best"):
    """Mean, std, count (``seeds``), 95% interval half-width (``ci95``), ``min`` and ``max``
    over seeds of ``value`` per setting (``by`` defaults to every setting column that
    varies). With 2 seeds ci95 is 12.7 x std / sqrt(2) (t with 1 degree of freedom), too
    wide to read; min and max are what the seeds gave."""
    if by is None:
        by = [c for c in setting_columns(runs) if runs[c].nunique(dropna=False) > 1] or \
            [c for c in ("model.path", "task.name") if c in runs.columns][:1]
    extra = [c for c in ("parameters",) if c in runs.columns and c not in by]
    g = runs.groupby(list(by), dropna=False)
    out = g[value].agg(["mean", "std", "count"]).rename(columns={"count": "seeds"})
    out["ci95"] = ci95(out["std"], out["seeds"])
    out["min"] = g[value].min()
    out["max"] = g[value].max()
    for c in extra:
        out[c] = g[c].first()
    out["best_step_mean"] = g["best_step"].mean()
    return out.reset_index()


def load_tables(directory: str) -> dict:
    """Every ``*.csv`` directly in ``directory`` as {file name without .csv: DataFrame}:
    a sweep directory's (``results``, ``runs``, ``summary``, ``ensemble``) or the lab's
    ``experiments/lab/results/tables`` (``pretraining``, ``probe``, ``fig1-summary``...)."""
    if not storage.isdir(directory):
        raise PtjaxError(f"{directory}: not a directory; give one that holds CSV tables")
    return {name[:-4]: pd.read_csv(io.StringIO(storage.read_text(os.path.join(directory, name))))
            for name in storage.listdir(directory) if name.endswith(".csv")}


def load_ensembles(directory: str):
    """The paper's ensemble table, one row per (job, metric): each prompt's score, their
    average, the best prompt's and the ensemble's."""
    rows = []
    seen = set()
    for entry in _entries(directory):
        if entry["job"] in seen:
            continue
        seen.add(entry["job"])
        path = os.path.join(entry["run_dir"], "results.json")
        if not storage.exists(path):
            continue
        results = _read_json(path)
        table = results.get("ensemble")
        if not table:
            continue
        cfg = config_lib.load_config(os.path.join(entry["run_dir"], "config.yaml"))
        for metric, values in table["prompts"].items():
            rows.append({"job": entry["job"], "task.name": cfg.task.name,
                         "model.path": cfg.model.path, "method.name": cfg.method.name,
                         "prompt.length": cfg.prompt.length,
                         "method": table["method"], "metric": metric, "prompts": len(values),
                         **{f"prompt_{k}": v for k, v in enumerate(values)},
                         "average": table["average"][metric], "best": table["best"][metric],
                         "ensemble": table["ensemble"][metric]})
    return pd.DataFrame(rows)


def nearest_tokens(prompt_PxD, embedding_VxD, tokenizer=None, k: int = 5):
    """The paper's interpretability probe: for each prompt position, the k vocabulary
    tokens whose embeddings are nearest by cosine similarity. -> DataFrame(position, rank,
    id, token, cosine)."""
    p = np.asarray(prompt_PxD, np.float32)
    e = np.asarray(embedding_VxD, np.float32)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sims = p @ e.T  # [P, V]
    top = np.argsort(-sims, axis=1)[:, :k]
    rows = []
    for pos in range(p.shape[0]):
        for rank, idx in enumerate(top[pos]):
            token = tokenizer.convert_ids_to_tokens(int(idx)) if tokenizer is not None \
                else str(int(idx))
            rows.append({"position": pos, "rank": rank, "id": int(idx), "token": token,
                         "cosine": float(sims[pos, idx])})
    return pd.DataFrame(rows)


def run_neighbors(run_dir: str, k: int = 5, prompt: int | None = None):
    """``nearest_tokens`` for the exported best prompts of a run (or job) directory:
    one DataFrame with a ``prompt`` column."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    table_path = os.path.join(run_dir, "export", "prompts.npy")
    for path in (cfg_path, table_path):
        if not storage.exists(path):
            raise PtjaxError(f"{path}: not found; give a finished prompt-tuning run directory")
    cfg = config_lib.load_config(cfg_path)
    model = load_run_model(cfg.model)
    table = np.load(io.BytesIO(storage.read_bytes(table_path)))
    which = range(table.shape[0]) if prompt is None else [prompt]
    if prompt is not None and not 0 <= prompt < table.shape[0]:
        raise PtjaxError(f"--prompt {prompt}: the run has prompts 0..{table.shape[0] - 1}")
    emb = to_host(input_embedding(model))
    return pd.concat([nearest_tokens(table[i], emb, model.tokenizer, k).assign(prompt=i)
                      for i in which], ignore_index=True)
