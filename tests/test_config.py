"""Run configs: YAML + dotted overrides into typed frozen dataclasses; one-line errors."""
import dataclasses

import pytest

from ptjax import config as C
from ptjax.errors import PtjaxError


def test_defaults_are_the_papers():
    cfg = C.load_config(None)
    assert cfg.prompt.length == 100 and cfg.prompt.low == -0.5 and cfg.prompt.high == 0.5
    assert cfg.prompt.vocab_limit == 5000 and cfg.prompt.fallback == "sampled_vocab"
    o = cfg.optim
    assert (o.name, o.learning_rate, o.schedule, o.weight_decay, o.decay_rate,
            o.multiply_by_parameter_scale) == ("adafactor", 0.3, "constant", 1e-5, 0.8, False)
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.dropout) == (32, 30000, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 1


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\nprompt:\n  length: 5\n  seeds: [1, 2]\n"
                    "optim:\n  learning_rate: 1e-3\n")
    cfg = C.load_config(str(path), ["train.steps=7", "prompt.seeds=3,4,5", "optim.b2=0.98",
                                    "task.labels=[no, yes]", "train.progress=false"])
    assert cfg.run_dir == "runs/x" and cfg.prompt.length == 5
    assert cfg.optim.learning_rate == 1e-3  # PyYAML reads "1e-3" as a string
    assert cfg.prompt.seeds == (3, 4, 5) and cfg.train.steps == 7
    assert cfg.task.labels == ("no", "yes") and cfg.train.progress is False
    # the resolved config written to a run directory reads back equal
    C.save_config(cfg, str(tmp_path / "resolved.yaml"))
    assert C.load_config(str(tmp_path / "resolved.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.learnig_rate=0.1", "unknown config key 'optim.learnig_rate'; did you mean "
                               "'optim.learning_rate'?"),
    ("train.step=5", "did you mean 'train.steps'?"),
    ("lr=0.1", "unknown config key 'lr'"),
    ("optim.name=lamb", "optim.name='lamb' is not valid; valid: adafactor, adam, adamw, sgd"),
    ("prompt.init=zeros", "valid: random_uniform, sampled_vocab, class_label, text, file"),
    ("train.steps=ten", "train.steps='ten' is not an integer"),
    ("optim.learning_rate=fast", "is not a number"),
    ("prompt.length=0", "prompt.length=0 must be >= 1"),
    ("train.steps", "must look like dotted.key=value"),
    ("prompt.init=file", "prompt.init=file needs prompt.file"),
    ("task.name=jsonl", "task.name=jsonl needs task.train_file and task.dev_file"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(PtjaxError) as e:
        C.load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_yaml_key_names_file_and_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompt:\n  lenght: 5\n")
    with pytest.raises(PtjaxError, match=r"c.yaml: unknown config key 'prompt.lenght'; "
                                         r"did you mean 'prompt.length'\?"):
        C.load_config(str(path))
    path.write_text("optim: adam\n")
    with pytest.raises(PtjaxError, match="'optim' is a section"):
        C.load_config(str(path))


@pytest.mark.parametrize("override, message", [
    ("trian.steps=5", "override 'trian.steps=5': unknown config key 'trian.steps'; did you "
                      "mean 'train.steps'?"),
    ("train.steps=ten", "override 'train.steps=ten': train.steps='ten' is not an integer"),
    ("train=3", "override 'train=3': 'train' is a section"),
])
def test_a_mistake_in_an_override_is_not_blamed_on_the_config_file(tmp_path, override,
                                                                  message):
    """Issue 31: a typo on the command line was reported as an error in the YAML file."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n")
    with pytest.raises(PtjaxError) as e:
        C.load_config(str(path), [override])
    assert str(e.value).startswith(message) and "c.yaml" not in str(e.value)


def test_shipped_experiment_configs_are_valid():
    """Every run config under experiments/ loads (sweep files: tests/test_sweep.py)."""
    import glob
    import os

    import yaml

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments")
    paths = [p for p in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
             if not {"grid", "zip", "seeds"} & set(yaml.safe_load(open(p)) or {})]
    assert any(p.endswith("prompt_tuning.yaml") for p in paths)
    assert any(p.endswith("lester2021/base.yaml") for p in paths)
    for path in paths:
        C.load_config(path)


def test_every_numeric_setting_has_a_checked_domain():
    """A new int / float setting must get a domain (POSITIVE, NON_NEGATIVE or DOMAINS) or
    be declared free: no numeric value goes unchecked."""
    import typing

    def numeric(cls, prefix=""):
        for name, typ in C.fields_of(cls).items():
            if dataclasses.is_dataclass(typ):
                yield from numeric(typ, f"{prefix}{name}.")
            elif typ in (int, float) or (typing.get_origin(typ) is tuple
                                         and typing.get_args(typ)[0] in (int, float)):
                yield f"{prefix}{name}"

    keys = set(numeric(C.RunConfig))
    checked = set(C.POSITIVE) | set(C.NON_NEGATIVE) | set(C.DOMAINS) | set(C.FREE)
    assert keys - checked == set()
    assert checked - keys == set()  # no stale entry
    for key, (low, high, _) in C.DOMAINS.items():  # each domain holds its default
        assert C.in_domain(C.get(C.RunConfig(), key), low, high), key


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=-0.3", "optim.learning_rate=-0.3 is out of range; valid: (0, inf) "
                                 "(a positive learning rate)"),
    ("optim.learning_rate=0", "optim.learning_rate=0.0 is out of range"),
    ("optim.learning_rate=.nan", "optim.learning_rate=nan is out of range"),
    ("task.dev_size=-2", "task.dev_size=-2 is out of range; valid: [0, inf) (0 = all dev "
                         "examples)"),
    ("optim.b1=1", "optim.b1=1.0 is out of range; valid: [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0 is out of range"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0"),
    ("optim.clipping_threshold=-1", "optim.clipping_threshold=-1.0"),
    ("method.ptuning.model_learning_rate=-1", "method.ptuning.model_learning_rate=-1.0"),
    ("train.data_shards=-1", "train.data_shards=-1 is out of range; valid: [0, inf)"),
    ("prompt.low=1", "prompt.low=1.0 must be below prompt.high=0.5"),
])
def test_numeric_domains_are_one_line_errors(override, message):
    with pytest.raises(PtjaxError) as e:
        C.load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_empty_config_file_is_an_error(tmp_path):
    for text in ("", "\n# only a comment\n", "---\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(PtjaxError, match="c.yaml: the config file is empty"):
            C.load_config(str(tmp_path / "c.yaml"))


def test_override_values_that_are_not_yaml():
    """A str key takes text YAML cannot read, or would read as a mapping / list, as the
    literal string (what the shell passed); other keys give a one-line error."""
    cfg = C.load_config(None, ["prompt.text={inputs} {soft:3}", "prompt.file=[a].npy",
                               "task.dev_file={x: 1}", "run_dir=runs/a: b"])
    assert cfg.prompt.text == "{inputs} {soft:3}" and cfg.prompt.file == "[a].npy"
    assert cfg.task.dev_file == "{x: 1}" and cfg.run_dir == "runs/a: b"
    with pytest.raises(PtjaxError,
                       match=r"override 'train.steps=\{3': the value is not valid YAML"):
        C.load_config(None, ["train.steps={3"])
    # tuples of strings keep YAML's list form
    assert C.load_config(None, ["task.labels=[no, yes]"]).task.labels == ("no", "yes")
