"""Strategy 3 (task.mixture): a mixture of prompted tasks, each encoded through its own
template, drawn by its rate as a pure function of the step; held-out tasks (task.transfer)
never trained and scored zero-shot through their own template; experiments/multitask.yaml
runs; bad mixtures are one-line errors."""
import dataclasses
import json
import os

import numpy as np
import pytest

from ptjax import cli
from ptjax.config import load_config
from ptjax.data import pipeline
from ptjax.data.templates import parse
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTURE = ('[{name: synthetic_sentiment, template: "{inputs} the film was {mask}", '
           'verbalizer: {negative: [bad], positive: [good]}}, '
           '{name: synthetic_qa, template: "{inputs} the answer is {mask}"}, '
           '{name: synthetic_sentiment_shifted, template: "{inputs} so this animal is {mask}", '
           'verbalizer: {negative: [awful], positive: [great]}}]')


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_model(build_tiny_model(str(tmp_path_factory.mktemp("mt") / "gpt2"), "gpt2"))


def test_mixture_stream_draws_by_rate_and_encodes_each_task_its_own_way(gpt2):
    examples = [[{"inputs": f"film {i}", "targets": "good"} for i in range(5)],
                [{"inputs": f"colour {i}", "targets": "red"} for i in range(7)],
                [{"inputs": f"held {i}", "targets": "x"} for i in range(3)]]
    templates = ["{inputs} the film was {mask}", "{inputs} the answer is {mask}", ""]
    parts = [pipeline.TrainStream(gpt2, {0: ex}, 1, 16, 16, 4, 0,
                                  template=parse(t) if t else None)
             for ex, t in zip(examples, templates)]
    stream = pipeline.MixtureStream(parts, [3, 1, 0], seed=5)
    assert stream.indices(7) == stream.indices(7)  # a pure function of the step (resume)
    drawn = [t for s in range(100) for t, _, _ in stream.indices(s)]
    assert 2 not in drawn  # weight 0: held out
    assert abs(np.mean(np.asarray(drawn) == 0) - 0.75) < 0.04
    arrays, _ = stream.batch(3)
    keys = stream.indices(3)
    for (t, _, i), ids, mask in zip(keys, arrays["input_ids"], arrays["input_mask"]):
        text = gpt2.tokenizer.decode(ids[mask == 1])
        want = {0: f"film {i} the film was good", 1: f"colour {i} the answer is red"}[t]
        assert text.strip().startswith(want), (text, want)


def test_held_out_task_is_scored_through_its_own_template(gpt2, tmp_path):
    from ptjax.taskdata import dev_task_config, transfer_dev_set

    cfg = load_config(None, [f"task.mixture={MIXTURE}",
                             "task.transfer=synthetic_sentiment_shifted", "task.dev_size=4",
                             "task.max_input_length=40", "task.max_target_length=4"])
    assert dev_task_config(cfg).name == "synthetic_sentiment"
    dev = transfer_dev_set(gpt2, cfg, "synthetic_sentiment_shifted")
    assert dev.verbalizer == (("negative", ("awful",)), ("positive", ("great",)))
    row = dev.arrays["input_ids"][0][dev.arrays["input_mask"][0] == 1]
    assert "so this animal is great" in gpt2.tokenizer.decode(row) or \
        "so this animal is awful" in gpt2.tokenizer.decode(row)


@pytest.mark.slow
def test_the_multitask_sweep_runs(tmp_path):
    """experiments/multitask.yaml as CI runs it (fewer steps): model tuning and a prompt
    trained on the mixture, the held-out task scored zero-shot."""
    from ptjax.sweep import load_sweep, run_sweep

    sweep = load_sweep(os.path.join(ROOT, "experiments", "multitask.yaml"), str(tmp_path / "mt"))

    def small(c):
        return dataclasses.replace(
            c, model=dataclasses.replace(c.model, tiny_dir=str(tmp_path / "models")),
            train=dataclasses.replace(c.train, steps=6, eval_every=3, checkpoint_every=3),
            task=dataclasses.replace(c.task, dev_size=16))
    sweep = dataclasses.replace(sweep, jobs=tuple(dataclasses.replace(j, config=small(j.config))
                                                  for j in sweep.jobs))
    assert run_sweep(sweep, progress=False)["failed"] == []
    for job in sweep.jobs:
        results = json.load(open(os.path.join(job.run_dir, "results.json")))
        assert results["mixture"] == ["synthetic_sentiment", "synthetic_qa"]
        assert results["task"] == "synthetic_sentiment"
        acc = results["transfer"]["synthetic_sentiment_shifted"]["accuracy"]
        assert len(acc) == 1 and 0 <= acc[0] <= 100


@pytest.mark.slow
def test_mixture_resumes_exactly(tmp_path):
    args = {"model.path": "tiny-gpt2", "model.tiny_dir": str(tmp_path / "models"),
            "task.mixture": MIXTURE, "task.mixture_rates": "2,1,0",
            "task.transfer": "synthetic_sentiment_shifted", "task.max_input_length": 40,
            "task.max_target_length": 4, "task.dev_size": 8, "train.batch_size": 8,
            "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
            "train.progress": False, "optim.name": "adam", "optim.learning_rate": 0.05,
            "prompt.length": 2}

    def run(name, **kw):
        a = {**args, "run_dir": str(tmp_path / name), **kw}
        assert cli.main(["train", *[f"{k}={v}" for k, v in a.items()]]) == 0
        return np.load(os.path.join(a["run_dir"], "export", "prompts.npy"))
    full = run("full")
    run("cut", **{"train.steps": 2})
    np.testing.assert_array_equal(run("cut"), full)


@pytest.mark.parametrize("kw, message", [
    ({"task.mixture_rates": "2,1"}, "task.mixture_rates='2,1' is not valid; valid: "
                                    "proportional, equal, or 3 numbers"),
    ({"task.mixture_rates": "2,1,1"}, "gives 'synthetic_sentiment_shifted' 1, but "
                                      "task.transfer holds it out"),
    ({"task.template": "{inputs}"}, "task.template is set with task.mixture"),
    ({"task.verbalizer_loss": "class", "task.verbalizer": "{a: [b]}"},
     "task.verbalizer is set with task.mixture"),
    ({"task.mixture": "[{name: nope}]", "task.transfer": ""},
     "task.mixture[0].name='nope' is not a task"),
    ({"task.mixture": '[{name: synthetic_qa, template: "{soft:2} {inputs}"}]',
      "task.transfer": ""}, "task.mixture[0].template has soft slots"),
    ({"task.mixture": "[{name: synthetic_qa}]", "task.transfer": "synthetic_qa"},
     "task.transfer holds out every task.mixture entry"),
    ({"task.mixture": "", "task.transfer": ""}, "task.mixture_rates='equal' needs task.mixture"),
])
def test_bad_mixtures_are_one_line_errors(tmp_path, capsys, kw, message):
    args = {"run_dir": str(tmp_path / "bad"), "task.mixture": MIXTURE,
            "task.transfer": "synthetic_sentiment_shifted", **kw}
    if message.startswith("task.mixture_rates='equal'"):
        args["task.mixture_rates"] = "equal"
    assert cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
