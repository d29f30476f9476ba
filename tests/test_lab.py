"""The lab: its downstream tasks from the corpus, the report's 95% intervals and
pre-training families, and the lab driver's smoke configuration."""
import collections
import json
import os
import sys

import numpy as np
import pytest

from ptjax import analysis, report
from ptjax.config import TaskConfig
from ptjax.data import corpus as corpus_lib
from ptjax.data.tasks import load_task

LAB = os.path.join(os.path.dirname(__file__), "..", "experiments", "lab")


@pytest.fixture(scope="module")
def corpus():
    return corpus_lib.load_corpus("shakespeare")


def _scene_of(corpus, split):
    """speech text -> the set of (play, scene) it occurs in, for a split."""
    where = collections.defaultdict(set)
    for d in getattr(corpus, split):
        for p in d.paragraphs:
            if ": " in p and not p.startswith("["):
                where[" ".join(p.split(": ", 1)[1].split())].add((d.title, d.section, d.genre))
    return where


def test_genre_task_is_balanced_real_speech_from_its_split(corpus):
    task = load_task(TaskConfig(name="shakespeare_genre"))
    assert task.labels == ("comedy", "history", "tragedy") and task.metric == "accuracy"
    for split, n in (("train", 300), ("validation", 100)):
        rows = task.splits[split]
        assert collections.Counter(r["targets"] for r in rows) == {
            "comedy": n, "history": n, "tragedy": n}
        where = _scene_of(corpus, split)
        genre = {v: k for k, v in corpus_lib.GENRES.items()}
        for r in rows[:60]:
            text = r["fields"]["text"]
            assert r["inputs"] == f"passage: {text}" and len(text.split()) <= 40
            hits = {g for full, places in where.items() if full.startswith(text)
                    for _, _, g in places}
            assert genre[r["targets"]] in hits  # the speech is from a play of its genre
    assert load_task(TaskConfig(name="shakespeare_genre")).splits == task.splits


def test_word_order_lines_are_real_or_have_one_shuffled_window(corpus):
    task = load_task(TaskConfig(name="shakespeare_order"))
    assert task.labels == ("false", "true")
    for split in ("train", "validation"):
        rows = task.splits[split]
        assert collections.Counter(r["targets"] for r in rows) == {
            "true": len(rows) // 2, "false": len(rows) // 2}
        firsts = {tuple(s[:20]) for d in getattr(corpus, split)
                  for s in corpus_lib._speeches(d) if len(s) >= 20}
        for r in rows[:80]:
            words = r["fields"]["text"].split()
            assert r["inputs"] == "line: " + " ".join(words) and len(words) == 20
            if r["targets"] == "true":
                assert tuple(words) in firsts
            else:  # one speech's words with one window of 6 reordered
                assert tuple(words) not in firsts
                spans = []
                for s in firsts:
                    if sorted(s) == sorted(words):
                        diff = [i for i in range(20) if s[i] != words[i]]
                        spans.append(max(diff) - min(diff) + 1)
                assert spans and min(spans) <= 6


def test_ci95_is_students_t_interval():
    # t(0.975, 4) = 2.7764: 5 seeds with std 1 -> 2.7764 / sqrt(5)
    np.testing.assert_allclose(analysis.ci95([1.0, 2.0], [5, 2]),
                               [2.7764451 / np.sqrt(5), 2 * 12.7062047 / np.sqrt(2)],
                               rtol=1e-6)
    assert np.isnan(analysis.ci95([0.0], [1])[0])
    import pandas as pd

    runs = pd.DataFrame({"prompt.length": [1, 1, 1, 5, 5, 5], "best": [1, 2, 3, 4, 4, 4.0],
                         "best_step": [1] * 6, "seed": [0, 1, 2] * 2})
    s = analysis.summarize(runs).set_index("prompt.length")
    np.testing.assert_allclose(s.loc[1, "ci95"], 4.3026527 * 1 / np.sqrt(3), rtol=1e-6)
    assert s.loc[5, "ci95"] == 0


def test_checkpoint_family_reads_ptjax_pretrain_results(tmp_path):
    def made(name, **results):
        os.makedirs(tmp_path / name / "model")
        with open(tmp_path / name / "results.json", "w") as f:
            json.dump(results, f)
        return str(tmp_path / name / "model")

    span = made("span-xs", objective="span_corruption", init="scratch", steps=1500)
    lm = made("lm500-xs", objective="prefix_lm", init=span, steps=500)
    assert report.checkpoint_family(span) == "span corruption"
    assert report.checkpoint_family(span, sentinel=True) == "span corruption + sentinel"
    assert report.checkpoint_family(lm) == "LM adapted (500 steps)"
    assert report.checkpoint_family("google/t5-xl-lm-adapt") == "LM adapted"


def _lab():
    sys.path.insert(0, LAB)
    try:
        import lab
    finally:
        sys.path.remove(LAB)
    return lab


def _model_paths(data):
    groups = [data.get("grid", {})] + (
        data["zip"] if isinstance(data.get("zip"), list) else [data.get("zip", {})])
    return [p for g in groups for p in g.get("model.path", [])]


def test_lab_cut_sweeps_keep_their_sizes_and_root(tmp_path):
    import yaml

    lab = _lab()
    root = str(tmp_path / "smoke")
    for name in lab.SWEEPS:
        with open(lab.cut_sweep(name, root, lab.SMOKE["sizes"], smoke=True)) as f:
            data = yaml.safe_load(f)
        paths = _model_paths(data)
        assert paths and all(p.startswith(root + "/pretrain/") and "-xs/" in p for p in paths)
        assert {p.split("/")[-2].split("-")[0] for p in paths} <= {"span", "lm2", "lm4"}
        assert data["dir"].startswith(root) and data["config"]["train.steps"] == 4
        assert len(data["seeds"]) == 2
        # a subset of sizes (the ~2 CPU-hour lab): those sizes, the full settings, every seed
        with open(os.path.join(LAB, name)) as f:
            full = yaml.safe_load(f)
        sub = str(tmp_path / "lab-xs-s-m")
        with open(lab.cut_sweep(name, sub, ("xs", "s", "m"))) as f:
            data = yaml.safe_load(f)
        want = [p.replace("runs/lab/", sub + "/") for p in _model_paths(full) if "-l/" not in p]
        assert _model_paths(data) == want and len(want) < len(_model_paths(full))
        assert data["seeds"] == full["seeds"] and data["dir"].startswith(sub)
        assert data.get("config", {}) == full.get("config", {})
    with pytest.raises(SystemExit):
        lab.main(["sweeps", "--sizes", "xs,xl"])  # one line naming the valid sizes
    # the full lab: 4 sizes spanning >= 30x (parameters of the T5 v1.1 each size builds)
    import jax

    from ptjax.config import PretrainConfig
    from ptjax.models.model import abstract_params
    from ptjax.pretrain import scratch_config

    counts = [sum(x.size for x in jax.tree.leaves(abstract_params(scratch_config(
        PretrainConfig(**arch), lab.COMMON["pretrain.vocab_size"], 0.0))))
        for arch in lab.SIZES.values()]
    assert counts == sorted(counts) and counts[-1] / counts[0] >= 30


def test_probe_scores_lines_as_transformers_does(tmp_path):
    """probe.line_nll (the decoder reading a line after an empty input) equals the summed
    token NLL transformers' T5 computes for the same labels; the probe's pairs are a
    held-out line and the same words with one window of 6 reordered."""
    from conftest import torch

    if torch is None:
        pytest.skip("needs torch")
    import transformers

    from ptjax.models.model import load_model
    from ptjax.models.tiny import build_tiny_model

    sys.path.insert(0, LAB)
    try:
        import probe
    finally:
        sys.path.remove(LAB)
    path = build_tiny_model(str(tmp_path / "t5"), family="t5")
    model = load_model(path)
    texts = ["the movie was good", "a b", "this story was really quite bad and dull"]
    nll, n = probe.line_nll(model, texts)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    for text, got, count in zip(texts, nll, n):
        labels = torch.tensor([model.tokenizer(text).input_ids])
        with torch.no_grad():
            out = ref(input_ids=torch.tensor([[model.tokenizer.eos_token_id]]), labels=labels)
        assert count == labels.shape[1]
        np.testing.assert_allclose(got, out.loss.item() * count, rtol=1e-5)
    pairs = probe.pairs(n=20)
    assert len(pairs) == 20 and all(a != b and sorted(a.split()) == sorted(b.split())
                                    for a, b in pairs)
    lo, hi = probe.wilson(128, 150)
    assert lo < 128 / 150 < hi and abs(lo - 0.7876) < 1e-3 and abs(hi - 0.9010) < 1e-3


def test_lab_report_tables_every_sweep_axis(tmp_path):
    """lab.py report pivots each sweep on its axis, numeric ones (prompt lengths) too, and
    names both settings where one method ran at two learning rates (the diagnostic)."""
    lab = _lab()
    root, out = tmp_path / "lab", tmp_path / "out"
    (root / "long").mkdir(parents=True)
    rows = ["model.path,task.name,method.name,optim.learning_rate,mean,std,seeds,ci95,"
            "parameters,best_step_mean"]
    for method, lr, mean in (("prompt", 0.3, 33.3), ("prompt", 0.03, 35.0),
                             ("model", 0.001, 41.0)):
        rows.append(f"runs/lab/pretrain/lm500-m/model,shakespeare_genre,{method},{lr},"
                    f"{mean},1.0,5,1.2,1812224,300.0")
    (root / "long" / "summary.csv").write_text("\n".join(rows) + "\n")
    # runs.csv + each job's metrics.jsonl: the last train loss of each member, mean over seeds
    runs = ["run,job,prompt,seed,model.path,task.name,method.name,optim.learning_rate,"
            "parameters"]
    for job, method, lr, losses in (("a", "prompt", 0.3, (2.5, 2.3)),
                                    ("b", "prompt", 0.03, (3.0, 3.2)),
                                    ("c", "model", 0.001, (0.2,))):
        (root / "long" / "jobs" / job).mkdir(parents=True)
        metrics = []
        for k, loss in enumerate(losses):
            runs.append(f"{job}{k},{job},{k},{k},runs/lab/pretrain/lm500-m/model,"
                        f"shakespeare_genre,{method},{lr},1812224")
            metrics += [json.dumps({"step": s, "split": "train", "prompt": k,
                                    "loss": loss + 9 * (s == 50)}) for s in (50, 100)]
        (root / "long" / "jobs" / job / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    (root / "long" / "runs.csv").write_text("\n".join(runs) + "\n")
    (root / "fig3a").mkdir(parents=True)
    rows = ["model.path,prompt.length,mean,std,seeds,ci95,parameters,best_step_mean"]
    for size, params in (("xs", 134384), ("s", 709632)):
        for length, mean in ((1, 33.3), (20, 40.0)):
            rows.append(f"runs/lab/pretrain/lm500-{size}/model,{length},{mean},1.0,5,1.2,"
                        f"{params},50.0")
    (root / "fig3a" / "summary.csv").write_text("\n".join(rows) + "\n")
    text = open(lab.report(str(root), str(out))).read()
    assert "## fig3a_length" in text
    assert "| parameters | 1 | 20 |" in text
    assert "| 134K | 33.3 ± 1.2 | 40.0 ± 1.2 |" in text
    assert "## long_tuning" in text
    assert ("| parameters | model, learning_rate 0.001 | prompt, learning_rate 0.03 | "
            "prompt, learning_rate 0.3 |") in text
    assert "| 1.81M | 41.0 ± 1.2 | 35.0 ± 1.2 | 33.3 ± 1.2 |" in text
    assert "| 1.81M | 0.20 | 3.10 | 2.40 |" in text  # model, prompt 0.03, prompt 0.3


def test_lab_report_writes_its_tables_and_they_load_back(tmp_path):
    """lab.py report writes OUT/tables/*.csv beside REPORT.md: the pre-training table (from
    each checkpoint's results.json), the probe's, and each sweep's summary, ensemble and
    train-loss tables; ``analysis.load_tables`` reads back tables equal to them."""
    import pandas as pd

    lab = _lab()
    root, out = tmp_path / "lab", tmp_path / "out"
    pre = []
    for name, objective, init, steps, loss in (("span-xs", "span_corruption", "scratch",
                                                1500, 6.25),
                                               ("lm500-xs", "prefix_lm", "span", 500, 6.5)):
        (root / "pretrain" / name / "model").mkdir(parents=True)
        results = {"objective": objective, "init": init, "steps": steps, "parameters": 134384,
                   "model": str(root / "pretrain" / name / "model"), "validation_loss": loss}
        (root / "pretrain" / name / "results.json").write_text(json.dumps(results))
        pre.append(results)
    model = str(root / "pretrain" / "lm500-xs" / "model")
    probe = pd.DataFrame({"checkpoint": [model], "objective": ["prefix_lm"], "steps": [500],
                          "parameters": [134384], "pairs": [150], "real_more_likely": [68.7],
                          "ci95_low": [60.9], "ci95_high": [75.5], "nll_per_token": [6.41]})
    probe.to_csv(root / "probe.csv", index=False)
    d = root / "fig1"
    (d / "jobs" / "j0").mkdir(parents=True)
    summary = pd.DataFrame({"model.path": [model] * 2, "task.name": ["shakespeare_genre"] * 2,
                            "method.name": ["model", "prompt"], "mean": [34.1, 33.3],
                            "std": [1.0, 0.0], "seeds": [5, 5], "ci95": [1.2, 0.0],
                            "min": [33.0, 33.3], "max": [35.5, 33.3],
                            "parameters": [134384] * 2, "best_step_mean": [150.0, 50.0]})
    summary.to_csv(d / "summary.csv", index=False)
    ensemble = pd.DataFrame({"job": ["j0"], "task.name": ["shakespeare_genre"],
                             "model.path": [model], "method.name": ["prompt"],
                             "prompt.length": [20], "method": ["majority"],
                             "metric": ["accuracy"], "prompts": [2], "prompt_0": [33.3],
                             "prompt_1": [34.0], "average": [33.65], "best": [34.0],
                             "ensemble": [33.3]})
    ensemble.to_csv(d / "ensemble.csv", index=False)
    (d / "runs.csv").write_text(
        "run,job,prompt,seed,model.path,task.name,method.name,parameters\n"
        + "".join(f"r{k},j0,{k},{k},{model},shakespeare_genre,{m},134384\n"
                  for k, m in enumerate(("model", "prompt"))))
    (d / "jobs" / "j0" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 100, "split": "train", "prompt": k, "loss": 5.0 + k}) + "\n"
        for k in range(2)))
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "fig3a_length-summary.csv").write_text("a\n1\n")  # from older runs
    lab.report(str(root), str(out))
    tables = analysis.load_tables(str(out / "tables"))
    assert sorted(tables) == ["fig1-ensemble", "fig1-summary", "fig1-train_loss",
                              "pretraining", "probe"]
    pd.testing.assert_frame_equal(tables["fig1-summary"], summary)
    pd.testing.assert_frame_equal(tables["fig1-ensemble"], ensemble)
    pd.testing.assert_frame_equal(tables["probe"], probe)
    want = pd.DataFrame([{"run": os.path.basename(os.path.dirname(r["model"])),
                          "model": r["model"], "parameters": r["parameters"],
                          "objective": o, "steps": r["steps"],
                          "validation_loss": r["validation_loss"]}
                         for r, o in zip(pre, ("span corruption", "LM adapted (500 steps)"))])
    pd.testing.assert_frame_equal(tables["pretraining"],
                                  want.sort_values("run").reset_index(drop=True))
    assert tables["fig1-train_loss"][["run", "loss"]].values.tolist() == [["r0", 5.0],
                                                                          ["r1", 6.0]]
    text = open(out / "REPORT.md").read()  # the report's tables are those numbers
    assert "| lm500-xs | 134K | LM adapted (500 steps) | 500 | 6.500 |" in text
    assert "| 134K | 34.1 ± 1.2 | 33.3 ± 0.0 |" in text and "| 134K | 5.00 | 6.00 |" in text
    with pytest.raises(analysis.PtjaxError, match="not a directory"):
        analysis.load_tables(str(tmp_path / "none"))


TABLES = os.path.join(LAB, "results", "tables")
TASKS = {"genre": "shakespeare_genre", "order": "shakespeare_order"}


def _md_table(text: str, header: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, rows of cells) of the one markdown table whose header row starts
    with ``header``."""
    lines = text.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(start) == 1, f"README.md: {len(start)} tables start with {header!r}"

    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    rows = []
    for line in lines[start[0] + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start[0]]), rows


def _where(df, **where):
    """The rows of ``df`` whose columns equal ``where`` (keys: column names)."""
    for k, v in where.items():
        df = df[df[k] == v]
    return df


def _one(df, **where):
    """The one row of ``df`` whose columns equal ``where``."""
    df = _where(df, **where)
    assert len(df) == 1, f"{len(df)} rows for {where}"
    return df.iloc[0]


def _run(path: str) -> str:
    """runs/lab/pretrain/lm500-m/model -> "lm500" (the checkpoint's family in the lab)."""
    return path.rstrip("/").split("/")[-2].split("-")[0]


def test_the_lab_readme_quotes_the_committed_tables():
    """experiments/lab/README.md's tables are the numbers in results/tables (written by
    ``lab.py report`` from the runs): the probe, Figure 1, Figures 3a-3d and the train
    losses. A rerun that changes a number fails here until the README says it."""
    tables = analysis.load_tables(TABLES)
    readme = open(os.path.join(LAB, "README.md")).read()
    sizes = {report.size_label(p): p for p in tables["pretraining"]["parameters"]}
    assert len(sizes) == 4

    def with_cols(df):
        return df.assign(size=[report.size_label(p) for p in df["parameters"]],
                         run=[_run(p) for p in df["model.path" if "model.path" in df
                                                  else "checkpoint"]])

    probe = with_cols(tables["probe"])
    head, rows = _md_table(readme, "| size | span corruption |")
    assert sorted(r[0] for r in rows) == sorted(sizes)
    for row in rows:
        for run, cell in zip(("span", "lm100", "lm500"), row[1:]):
            r = _one(probe, size=row[0], run=run)
            assert cell == f"{r['real_more_likely']:.1f}", (row[0], run)

    def acc(r):
        return f"{r['mean']:.1f} ± {r['ci95']:.1f}"

    fig1 = with_cols(tables["fig1-summary"])
    methods = {"prompt": "prompt", "prefix": "prefix", "P-tuning": "ptuning",
               "model": "model", "design (2-shot)": "design"}
    head, rows = _md_table(readme, "| size | task | prompt |")
    assert len(rows) == 8 and head[2:] == list(methods)
    for row in rows:
        for col, cell in zip(head[2:], row[2:]):
            r = _one(fig1, size=row[0], **{"task.name": TASKS[row[1]],
                                           "method.name": methods[col]})
            assert cell == acc(r), (row[:2], col)

    # Figures 3a-3d, one table: each row one setting, each column one size (genre task)
    cd = with_cols(tables["fig3cd_pretraining-summary"])
    init = with_cols(tables["fig3b_init-summary"])
    length = with_cols(tables["fig3a_length-summary"])
    settings = {  # README row: (table, the row's columns)
        "span corruption": (cd, {"run": "span", "task.target_sentinel": False}),
        "span corruption + sentinel": (cd, {"run": "span", "task.target_sentinel": True}),
        "LM adaptation 100 steps": (cd, {"run": "lm100"}),
        "LM adaptation 500 steps": (cd, {"run": "lm500"}),
        **{f"init {i.replace('_', ' ')}": (init, {"prompt.init": i})
           for i in ("random_uniform", "sampled_vocab", "class_label")},
        **{f"length {n}": (length, {"prompt.length": n}) for n in (1, 5, 20, 50)}}
    head, rows = _md_table(readme, "| genre, prompt tuning |")
    assert [r[0] for r in rows] == list(settings) and sorted(head[1:]) == sorted(sizes)
    for row in rows:
        for size, cell in zip(head[1:], row[1:]):
            df, where = settings[row[0]]
            assert cell == acc(_one(df, size=size, **where)), (row[0], size)

    # last train loss, mean over seeds (genre): Figure 3a's lengths and Figure 1's methods
    def loss(df, **where):
        return _where(with_cols(df), **where).groupby("size")["loss"].mean()

    losses = {f"prompt length {n}": loss(tables["fig3a_length-train_loss"],
                                         **{"prompt.length": n}) for n in (1, 5, 20, 50)}
    for name, method in (("prefix tuning (10)", "prefix"), ("P-tuning (20)", "ptuning"),
                         ("model tuning", "model")):
        losses[name] = loss(tables["fig1-train_loss"], **{"task.name": TASKS["genre"],
                                                          "method.name": method})
    head, rows = _md_table(readme, "| genre task |")
    assert [r[0] for r in rows] == list(losses) and sorted(head[1:]) == sorted(sizes)
    for row in rows:
        for size, cell in zip(head[1:], row[1:]):
            assert cell == f"{losses[row[0]][size]:.2f}", (row[0], size)
