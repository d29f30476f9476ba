"""Templates (task.template): parsing, layout and truncation, "{soft:P} {inputs}" equal to
the prepended prompt, soft slots in the middle trained, packed and resumed, T5's {mask}
as <extra_id_0>, and one-line errors for bad templates."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import cli, load_run
from ptjax.data import encoding
from ptjax.data.tasks import synthetic
from ptjax.data.templates import parse
from ptjax.errors import PtjaxError
from ptjax.methods import for_model
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model
from ptjax.train import loss_fn

EXAMPLES = [
    {"inputs": "review: the movie was great", "targets": "positive",
     "fields": {"premise": "the cat is red", "hypothesis": "a red cat"}},
    {"inputs": "review: a very dull and boring film with a bland ending", "targets": "negative",
     "fields": {"premise": "the dog is blue and the bird is green and the fish is white",
                "hypothesis": "a dog"}},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-templates")
    return {"t5": load_model(build_tiny_model(str(d / "t5"), "t5", extra_ids=2)),
            "gpt2": load_model(build_tiny_model(str(d / "gpt2"), "gpt2"))}


def test_parse_numbers_soft_vectors_in_order_of_first_use():
    t = parse("{premise} {soft:3} {hypothesis}? {soft:2#a} {mask} {soft:2#a} {soft:1=it}")
    assert t.soft_tokens == 6 and t.has_mask and t.fields == ("premise", "hypothesis")
    soft = [(p.start, p.n) for p in t.pieces if p.kind == "soft"]
    assert soft == [(0, 3), (3, 2), (3, 2), (5, 1)]  # #a shares its two vectors
    assert t.soft_inits == ((5, 1, "it"),)
    assert parse("{{literal}} {inputs}").pieces[0].text == "{literal}"


@pytest.mark.parametrize("source, message", [
    ("{inputs", "unmatched '{' at character 0"),
    ("{inputs} {mask} {mask}", "has two {mask} slots"),
    ("{soft:0} {inputs}", "{soft:0} is not a soft slot"),
    ("{soft:2#a} {soft:3#a} {inputs}", "soft slot #a has 2 tokens in one place and 3"),
    ("{soft:3} no fields", "has no field of the example"),
    ("{inputs} {what is this}", "{what is this} is neither a field name"),
])
def test_bad_templates_are_one_line_errors(source, message):
    with pytest.raises(PtjaxError, match="task.template=") as e:
        parse(source)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_soft_prompt_template_equals_the_prepended_prompt(tiny, family):
    """"{soft:P} {inputs}": the same arrays' content, and the loss and prompt gradient
    equal prepending the prompt (1e-6), with dropout."""
    model = tiny[family]
    P, Li, Lt = 4, 12, 4
    plain, _ = encoding.encode(model, EXAMPLES, Li, Lt)
    templ, _ = encoding.encode(model, EXAMPLES, Li, Lt, template=parse(f"{{soft:{P}}} {{inputs}}"))
    assert (templ["slots"][:, :P] == np.arange(P)).all() and (templ["slots"][:, P:] == -1).all()
    if family == "t5":
        np.testing.assert_array_equal(templ["input_ids"][:, P:], plain["input_ids"])
    method = for_model(model, "prompt", [f"prompt.length={P}", "prompt.seeds=[0,1]"])
    table = {"prompt": jax.random.uniform(jax.random.key(0), (2, P, model.config.hidden_size),
                                          minval=-0.5, maxval=0.5)}

    def loss_and_grad(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith("gen_")}
        f = lambda t: loss_fn(model, method, t, model.params, batch,  # noqa: E731
                              jax.random.key(1), 0.1)
        return jax.value_and_grad(f, has_aux=True)(table)

    (loss_a, per_a), grad_a = loss_and_grad(plain)
    (loss_b, per_b), grad_b = loss_and_grad(templ)
    np.testing.assert_allclose(np.asarray(per_b), np.asarray(per_a), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_b["prompt"]), np.asarray(grad_a["prompt"]),
                               rtol=1e-6, atol=1e-6)


def test_layout_truncates_fields_never_the_template(tiny):
    model = tiny["t5"]
    tok = model.tokenizer
    t = parse("premise {premise} {soft:2} question {hypothesis} answer {mask}")
    (ids, _, cut), (ids2, _, cut2) = encoding.tokenize(model, EXAMPLES, 14, 4, template=t)
    sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
    assert ids.count(-1) == 1 and ids.count(-2) == 1  # the two soft tokens, in place
    assert ids[-2:] == [sentinel, model.config.eos_token_id]  # {mask}, then EOS
    text = tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)
    assert text.split() == "premise the cat is red question a red cat answer".split()
    assert cut2 and not cut and len([i for i in ids2 if i >= 0]) == 14  # the long premise cut
    text2 = tok.decode([i for i in ids2 if i >= 0], skip_special_tokens=True).split()
    assert text2[:4] == "premise the dog is".split() and text2[-4:] == \
        "question a dog answer".split() and len(text2) < 16
    with pytest.raises(PtjaxError, match="its own text takes .* of task.max_input_length=3"):
        encoding.tokenize(model, EXAMPLES, 3, 4, template=t)
    with pytest.raises(PtjaxError, match=r"the examples have no field \{claim\}; they have: "
                                         r"\{premise\}, \{hypothesis\}, \{inputs\}"):
        encoding.tokenize(model, EXAMPLES, 14, 4, template=parse("{claim} {mask}"))


def _train(tmp_path, name, **kw):
    args = {"run_dir": str(tmp_path / name), "model.tiny_dir": str(tmp_path / "models"),
            "model.path": "tiny-t5", "prompt.seeds": "[0,1]", "task.max_input_length": 24,
            "task.max_target_length": 4, "task.dev_size": 16, "train.batch_size": 8,
            "train.eval_batch_size": 16, "train.steps": 6, "train.eval_every": 3,
            "train.checkpoint_every": 3, "train.progress": False, "optim.name": "adam",
            "optim.learning_rate": 0.01, **kw}
    code = cli.main(["train", *[f"{k}={v}" for k, v in args.items()]])
    return code, args["run_dir"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_slots_in_the_middle_train_pack_and_resume(tmp_path, method):
    """A template with soft slots between fields (a word-initialised one among them) trains
    with either method, two packed members equal two separate runs, and a run stopped at
    step 3 and resumed ends where an uninterrupted one does."""
    template = "review {soft:2} {inputs} {soft:2=it was} . {soft:2#a}"
    common = {"task.template": template, "method.name": method, "method.ptuning.hidden": 8}
    code, both = _train(tmp_path, "both", **common)
    assert code == 0
    results = json.load(open(os.path.join(both, "results.json")))
    assert [p["best_step"] > 0 for p in results["prompts"]] == [True, True]
    # the prompt sits inside the input, where no PEFT adapter can put it: none is written
    assert os.path.exists(os.path.join(both, "export", "prompt-0", "prompt.npy"))
    assert not os.path.exists(os.path.join(both, "export", "prompt-0", "adapter_config.json"))
    for k, seed in enumerate((0, 1)):
        assert _train(tmp_path, f"one{seed}", **common, **{"prompt.seeds": f"[{seed}]"})[0] == 0
    runs = [load_run(both)] + [load_run(str(tmp_path / f"one{s}")) for s in (0, 1)]
    for k in range(2):
        jax.tree.map(lambda a, c: np.testing.assert_allclose(
            np.asarray(a)[k], np.asarray(c)[0], rtol=1e-5, atol=1e-5),
            runs[0].trainables, runs[1 + k].trainables)
    # resume: 3 steps, then the same run continued to 6
    assert _train(tmp_path, "cut", **common, **{"train.steps": 3})[0] == 0
    assert _train(tmp_path, "cut", **common)[0] == 0
    cut = load_run(str(tmp_path / "cut"))
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), np.asarray(c)),
                 cut.trainables, runs[0].trainables)
    assert runs[0].config.prompt.length == 6  # the template's soft tokens are the prompt


def test_t5_mask_is_the_first_sentinel_and_targets_follow_it(tiny):
    model = tiny["t5"]
    sentinel = model.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    t = parse("{premise} {mask}")
    from ptjax import taskdata
    from ptjax.config import TaskConfig

    enc = taskdata.encoding(model, TaskConfig(template=t.source, max_target_length=4))
    assert enc["target_prefix"] == (sentinel,)
    arrays, _ = encoding.encode(model, EXAMPLES[:1], 12, 4, **enc)
    row = list(arrays["input_ids"][0][arrays["input_mask"][0] == 1])
    assert row[-2:] == [sentinel, model.config.eos_token_id]
    assert arrays["targets"][0][0] == sentinel


def test_gpt2_mask_must_come_last_and_overrides_keep_braces(tmp_path, capsys):
    code, _ = _train(tmp_path, "bad", **{"model.path": "tiny-gpt2",
                                         "task.template": "{mask} {inputs}"})
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "task.template='{mask} {inputs}': on a decoder-only model the answer follows" in err
    code, _ = _train(tmp_path, "bad2", **{"method.name": "prefix",
                                          "task.template": "{soft:2} {inputs}"})
    err = capsys.readouterr().err.strip()
    assert code == 2 and "task.template has soft slots, which method.name=prefix" in err
    code, run_dir = _train(tmp_path, "gpt2", **{"model.path": "tiny-gpt2", "train.steps": 2,
                                                "task.template": "{soft:2} {inputs} {mask}"})
    assert code == 0


def test_template_and_verbalizer_train_and_score_classes(tmp_path, capsys):
    """Strategy 2 end to end: a frozen GPT-2, a template ending in {mask} and label words
    per class; training targets are each class's first word, dev accuracy ranks classes by
    their words, and a label without words is a one-line error on train as on dev."""
    verbalizer = "{negative: [bad, awful], positive: [good, great]}"
    code, run_dir = _train(tmp_path, "verb", **{
        "model.path": "tiny-gpt2", "task.template": "{inputs} the film was {mask}",
        "task.verbalizer": verbalizer, "train.steps": 4, "train.eval_every": 2})
    assert code == 0
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert all(0 <= p["best_accuracy"] <= 100 for p in results["prompts"])
    capsys.readouterr()
    code, _ = _train(tmp_path, "verb-bad", **{
        "model.path": "tiny-gpt2", "task.verbalizer": "{negative: [bad]}"})
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "target 'positive' has no label words in task.verbalizer (classes: negative)" in err
    code, _ = _train(tmp_path, "verb-bad2", **{"task.verbalizer": "[bad, good]"})
    err = capsys.readouterr().err.strip()
    assert code == 2 and "task.verbalizer=" in err and "a mapping of classes to label words" \
        in err


def test_prompt_design_evaluates_the_frozen_model_with_k_shots(tmp_path, capsys):
    """method.name=design: no training; every dev input is preceded by k solved train
    examples (a seeded draw per example, the template's text with the answer at {mask});
    zero-shot and k-shot runs write results a sweep and the report read."""
    from ptjax.data.templates import parse
    from ptjax.design import with_demonstrations

    pool = [{"inputs": f"review: film {i}", "targets": "positive" if i % 2 else "negative"}
            for i in range(10)]
    t = parse("{inputs} it was {mask}")
    out = with_demonstrations(pool[:2], pool, 3, 7, t, (("negative", ("bad",)),
                                                        ("positive", ("good", "great"))))
    again = with_demonstrations(pool[:2], pool, 3, 7, t, (("negative", ("bad",)),
                                                          ("positive", ("good",))))
    assert out == again and out[0]["fields"]["demos"] != out[1]["fields"]["demos"]
    demos = out[0]["fields"]["demos"].split(" review: ")
    assert len(demos) == 3 and all(d.endswith(("it was bad", "it was good")) for d in demos)
    results = {}
    for shots in (0, 2):
        code, run_dir = _train(tmp_path, f"design{shots}", **{
            "method.name": "design", "task.shots": shots, "prompt.seeds": "[3]",
            "model.path": "tiny-gpt2", "task.template": "{inputs} it was {mask}",
            "task.verbalizer": "{negative: [bad], positive: [good]}",
            "task.max_input_length": 60})
        assert code == 0
        results[shots] = json.load(open(os.path.join(run_dir, "results.json")))
        assert results[shots]["method"] == "design" and results[shots]["steps"] == 0
        assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
        rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert [(r["step"], r["split"]) for r in rows] == [(0, "validation")]
    capsys.readouterr()
    code, _ = _train(tmp_path, "design-bad", **{"task.shots": 2})
    assert code == 2 and "task.shots=2 (in-context examples) is for method.name=design" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_the_prompt_design_sweep_runs(tmp_path):
    """experiments/prompt_design.yaml as CI runs it: 3 shot counts x 3 draws, no training,
    one results row per run."""
    from ptjax import analysis as pa
    from ptjax.sweep import load_sweep, run_sweep

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sweep = load_sweep(os.path.join(root, "experiments", "prompt_design.yaml"),
                       str(tmp_path / "design"))
    models = str(tmp_path / "models")  # not the repo's runs/models
    sweep = dataclasses.replace(sweep, jobs=tuple(dataclasses.replace(j, config=dataclasses.replace(
        j.config, model=dataclasses.replace(j.config.model, tiny_dir=models)))
        for j in sweep.jobs))
    assert run_sweep(sweep, progress=False)["failed"] == []
    runs = pa.load_runs(str(tmp_path / "design"))
    assert len(runs) == 9 and sorted(set(runs["task.shots"])) == [0, 2, 4]
    # finished design jobs count as done: a rerun skips them (and the sweep's report runs)
    again = run_sweep(sweep, progress=False)
    assert again["done"] == [] and len(again["skipped"]) == len(sweep.jobs)


@pytest.mark.slow
def test_the_template_ensemble_experiment_runs(tmp_path):
    """experiments/template_ensemble.yaml as CI runs it (fewer steps): three templates in
    one batch, each scored alone and fused by mean log-probability."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "te"
    assert cli.main(["train", os.path.join(root, "experiments", "template_ensemble.yaml"),
                     f"run_dir={run}", f"model.tiny_dir={tmp_path / 'models'}",
                     "train.steps=20", "train.eval_every=10", "train.checkpoint_every=20",
                     "--no-progress"]) == 0
    with open(run / "results.json") as f:
        ens = json.load(f)["ensemble"]
    assert ens["method"] == "mean_logprob" and len(ens["prompts"]["accuracy"]) == 3
    assert 0 <= ens["ensemble"]["accuracy"] <= 100


def test_mask_on_a_t5_without_sentinels_is_one_line_naming_the_template(tmp_path, capsys):
    bare = build_tiny_model(str(tmp_path / "t5-bare"), "t5", extra_ids=0)
    code = cli.main(["train", f"model.path={bare}", f"run_dir={tmp_path / 'run'}",
                     "task.template=review {inputs} {mask}", "train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "task.template='review {inputs} {mask}'" in err[0] and "<extra_id_0>" in err[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_generation_with_soft_slots_equals_a_loop_over_logits(tiny, family):
    """Greedy KV-cache decoding behind a template's soft slots (inside the input, GPT-2
    left-padded) gives the tokens that re-running the forward and taking the argmax gives."""
    from ptjax.evaluation import rows_of
    from ptjax.models.common import PromptInputs

    model = tiny[family]
    t = parse("question {soft:2} {inputs} {soft:1} answer")
    arrays, _ = encoding.encode(model, EXAMPLES, 12, 4, template=t)
    ids, mask, slots = ((arrays["input_ids"], arrays["input_mask"], arrays["slots"])
                        if family == "t5" else
                        (arrays["gen_ids"], arrays["gen_mask"], arrays["gen_slots"]))
    embeds = 3 * jax.random.normal(jax.random.key(0), (1, 3, model.config.hidden_size))
    prompt = rows_of(PromptInputs(embeds=embeds), len(ids)).replace(slots=jnp.asarray(slots))
    out = np.asarray(model.generate(model.params, ids, attention_mask=mask, prompt=prompt,
                                    max_new_tokens=4))
    for b in range(len(ids)):
        one = PromptInputs(embeds=embeds[0], slots=jnp.asarray(slots[b:b + 1]))
        want = []
        if family == "t5":
            dec = [model.config.decoder_start_token_id]
            for _ in range(4):
                logits = model.logits(model.params, ids[b:b + 1], attention_mask=mask[b:b + 1],
                                      decoder_input_ids=np.array([dec]), prompt=one)
                dec.append(int(np.argmax(logits[0, -1])))
            want = dec[1:]
        else:
            keep = mask[b] == 1
            seq, sl = list(ids[b][keep]), list(slots[b][keep])
            for _ in range(4):
                logits = model.logits(model.params, np.array([seq]), prompt=PromptInputs(
                    embeds=embeds[0], slots=jnp.asarray([sl])))
                want.append(int(np.argmax(logits[0, -1])))
                seq.append(want[-1])
                sl.append(-1)
        eos = model.config.eos_token_id
        n = want.index(eos) + 1 if eos in want else 4
        assert list(out[b][:n]) == want[:n]


@pytest.mark.slow
def test_several_templates_train_side_by_side_and_ensemble(tmp_path):
    """task.templates: member k trains behind template k in one batch (arrays [B, K, ...]),
    ending where a run of that template alone ends; the members' scores ensemble."""
    t0, t1 = "{soft:2} {inputs} {soft:1}", "review {inputs} it was {soft:3=quite good}"
    common = {"task.verbalizer": "{negative: [bad], positive: [good]}"}
    code, both = _train(tmp_path, "both", **common, **{
        "task.templates": json.dumps([t0, t1]), "train.ensemble": "mean_logprob"})
    assert code == 0
    results = json.load(open(os.path.join(both, "results.json")))
    assert results["ensemble"]["method"] == "mean_logprob"
    assert len(results["ensemble"]["prompts"]["accuracy"]) == 2
    runs = [load_run(both)]
    for seed, t in ((0, t0), (1, t1)):
        code, d = _train(tmp_path, f"one{seed}", **common, **{"task.template": t,
                                                                "prompt.seeds": f"[{seed}]"})
        assert code == 0
        runs.append(load_run(d))
    for k in range(2):
        np.testing.assert_allclose(np.asarray(runs[0].trainables["prompt"][k]),
                                   np.asarray(runs[1 + k].trainables["prompt"][0]),
                                   rtol=1e-5, atol=1e-5)


def test_several_templates_are_checked(tmp_path, capsys):
    for kw, message in [
        ({"task.templates": '["{inputs}", "{soft:2} {inputs}"]'},
         "mixes templates with and without soft slots"),
        ({"task.templates": '["{soft:2} {inputs}"]'},
         "task.templates has 1 templates for 2 members"),
        ({"task.templates": '["{inputs}", "{inputs}"]', "task.template": "{inputs}"},
         "give task.template (one for all members) or task.templates"),
    ]:
        code, _ = _train(tmp_path, "bad", **kw)
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err, err


@pytest.mark.slow
def test_weighted_template_fusion(tmp_path, capsys):
    """train.ensemble_weighting: two templates fused with PET's weights (each member's dev
    metric on train examples before training) or fixed ones. With the train file equal to
    the dev file and a learning rate too small to move a prompt (1e-30: below fp32's
    resolution), PET's weights must equal each member's best dev accuracy, which the
    training loop's evaluation measured by another path; `ptjax eval --ensemble` reuses
    the weights the run saved."""
    rows = synthetic("synthetic_sentiment", n_train=16, n_dev=16).split("validation")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"task.name": "jsonl", "task.train_file": str(data), "task.dev_file": str(data),
              "task.labels": "[negative,positive]", "task.dev_size": 0,
              "task.templates": json.dumps(["{soft:2} {inputs}", "{inputs} it was {soft:2}"]),
              "train.ensemble": "mean_logprob", "optim.name": "sgd",
              "optim.learning_rate": 1e-30, "train.steps": 2, "train.eval_every": 2,
              "train.checkpoint_every": 2}
    code, run = _train(tmp_path, "pet", **common, **{"train.ensemble_weighting": "train"})
    assert code == 0
    results = json.load(open(os.path.join(run, "results.json")))
    best = [p["best_accuracy"] for p in results["prompts"]]
    assert results["ensemble"]["weights"] == pytest.approx(best, abs=1e-9)
    assert len(set(best)) == 2, "the templates score alike: the test shows nothing"
    assert cli.main(["eval", run, "--ensemble", "mean_logprob"]) == 0
    assert f"ensemble (mean_logprob) {results['ensemble']['ensemble']['accuracy']:.2f}" in \
        capsys.readouterr().out
    code, fixed = _train(tmp_path, "fixed", **common, **{
        "train.ensemble_weighting": "fixed", "train.ensemble_weights": "[1,0]"})
    ens = json.load(open(os.path.join(fixed, "results.json")))["ensemble"]
    assert code == 0 and ens["weights"] == [1.0, 0.0]
    assert ens["ensemble"]["accuracy"] == ens["prompts"]["accuracy"][0]  # member 0 alone
    code, _ = _train(tmp_path, "bad", **common, **{"train.ensemble_weights": "[1,2]"})
    assert code == 2 and "goes with (and only with) train.ensemble_weighting=fixed" in \
        capsys.readouterr().err
