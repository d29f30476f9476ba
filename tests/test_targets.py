"""The compile matrix: a run's train step, eval step and KV-cache decoding compiled for
an H100 and a TPU v5e, one chip and several (data and model axes), without the hardware
(``ptjax.targets``), for every method, both model families and every attention path.

Runs in the targets venv (``make test-targets``: ``pip install 'ptjax[targets]'``, JAX
started on its CPU); the default suite leaves these out (marker ``targets``). The cases
are chosen so every code path is compiled once, not every combination: each method, each
verbalizer loss, template slots, K = 1 and 5, remat none and auto, attention auto / cudnn /
xla at odd and even lengths.
"""
import jax
import pytest

from ptjax import aot, cli
from ptjax.config import from_dict
from ptjax.plan import compile_plan, plan
from ptjax.targets import describe

pytestmark = pytest.mark.targets


@pytest.fixture(autouse=True, scope="module")
def no_compilation_cache():
    """Executables for compile-only devices cannot be read back from XLA's cache (the
    suite's conftest turns it on): every compile here is fresh."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)

CUDNN = "__cudnn$fmha"  # jax's cuDNN flash-attention custom calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def targets():
    return {"h100": describe("h100"), "8xh100": describe("h100", "8"),
            "v5e": describe("tpu-v5e"), "v5e-2x2": describe("tpu-v5e", "2x2")}


def _cfg(tiny, model="tiny-t5", method="prompt", K=1, odd=False, mesh=(1, 1), **kw):
    """A small bf16 run: prompt 8, input 24 (23 with ``odd``) and target 4, batch 8."""
    base = {"model": {"path": model, "tiny_dir": tiny, "dtype": "bfloat16"},
            "method": {"name": method},
            "prompt": {"length": 8, "seeds": list(range(K))},
            "task": {"max_input_length": 23 if odd else 24, "max_target_length": 4},
            "train": {"batch_size": 8, "dropout": 0.0, "attention_dropout": 0.0,
                      "eval_batch_size": 8},
            "mesh": {"data": mesh[0], "model": mesh[1]}}
    for key, value in kw.items():
        section, name = key.split("__", 1)
        base.setdefault(section, {})
        node = base[section]
        *parents, leaf = name.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(base)


def _hlo(compiled) -> str:
    return compiled.as_text()


# (case id, target, model, method, K, odd lengths, mesh, overrides, cuDNN expected in
# the train step: True / False / None for "either")
CASES = [
    # auto on a GPU: cuDNN wherever its conditions hold (bf16, right-padded, even T and S)
    ("t5-prompt-auto-even", "h100", "tiny-t5", "prompt", 1, False, (1, 1), {}, True),
    ("gpt2-prompt-auto-even", "h100", "tiny-gpt2", "prompt", 1, False, (1, 1), {}, True),
    # ... and XLA's attention, no crash, where they do not (finding 1: odd lengths)
    # (T5 at input 23: the encoder and cross-attention run XLA's, the decoder's 4 x 4
    # self-attention still cuDNN)
    ("t5-prompt-auto-odd", "h100", "tiny-t5", "prompt", 1, True, (1, 1), {}, None),
    ("gpt2-prefix-auto-odd", "h100", "tiny-gpt2", "prefix", 1, True, (1, 1), {}, False),
    # K = 5 packed members through cuDNN (finding 6: the vmap batcher's reshape)
    ("t5-prompt-K5-cudnn", "h100", "tiny-t5", "prompt", 5, False, (1, 1),
     {"model__attention": "cudnn"}, True),
    ("gpt2-prompt-K5-auto", "h100", "tiny-gpt2", "prompt", 5, False, (1, 1), {}, True),
    ("t5-prefix-K5-auto", "h100", "tiny-t5", "prefix", 5, False, (1, 1), {}, True),
    ("t5-ptuning-mlp", "h100", "tiny-t5", "ptuning", 5, False, (1, 1), {}, True),
    ("gpt2-ptuning-lstm", "h100", "tiny-gpt2", "ptuning", 1, False, (1, 1),
     {"method__ptuning__encoder": "lstm"}, True),
    ("t5-model-tuning", "h100", "tiny-t5", "model", 1, False, (1, 1), {}, True),
    ("t5-xla", "h100", "tiny-t5", "prompt", 1, False, (1, 1), {"model__attention": "xla"},
     False),
    ("t5-template-slots", "h100", "tiny-t5", "prompt", 1, False, (1, 1),
     {"task__template": "{soft:8} {inputs} it was {mask}"}, None),
    ("t5-class-loss", "h100", "tiny-t5", "prompt", 1, False, (1, 1),
     {"task__name": "synthetic_sentiment", "task__verbalizer_loss": "class",
      "task__verbalizer": {"negative": ["bad", "awful"], "positive": ["good", "great"]}},
     None),
    ("gpt2-soft-verbalizer", "h100", "tiny-gpt2", "prompt", 1, False, (1, 1),
     {"task__name": "synthetic_sentiment", "task__verbalizer_kind": "soft",
      "task__verbalizer": {"negative": ["bad"], "positive": ["good"]}}, None),
    ("t5-remat-auto", "h100", "tiny-t5", "prompt", 1, False, (1, 1),
     {"model__remat": "auto"}, True),
    # several GPUs: data and model axes
    ("t5-prompt-8gpu", "8xh100", "tiny-t5", "prompt", 5, False, (4, 2), {}, True),
    ("gpt2-model-8gpu", "8xh100", "tiny-gpt2", "model", 1, True, (4, 2), {}, False),
    # TPU v5e: one chip and a 2x2 slice
    ("t5-prompt-v5e", "v5e", "tiny-t5", "prompt", 5, True, (1, 1), {}, False),
    ("gpt2-prefix-v5e", "v5e", "tiny-gpt2", "prefix", 1, False, (1, 1),
     {"model__remat": "auto"}, False),
    ("t5-model-v5e-2x2", "v5e-2x2", "tiny-t5", "model", 1, False, (2, 2), {}, False),
    ("gpt2-ptuning-v5e-2x2", "v5e-2x2", "tiny-gpt2", "ptuning", 5, True, (2, 2),
     {"model__attention": "xla"}, False),
]


@pytest.mark.parametrize("case, target, model, method, K, odd, mesh, kw, cudnn", CASES,
                         ids=[c[0] for c in CASES])
def test_the_step_compiles_for_the_target(tiny, targets, case, target, model, method, K,
                                          odd, mesh, kw, cudnn):
    cfg = _cfg(tiny, model, method, K, odd, mesh, **kw)
    p = compile_plan(cfg, target=targets[target])
    assert p.mesh.devices.flat[0].platform == targets[target].platform
    if cudnn is not None:
        assert (CUDNN in _hlo(p.compiled)) is cudnn, case
    if targets[target].platform == "tpu":
        assert CUDNN not in _hlo(p.compiled)
    # the eval step and decoding compile for the same devices
    aot.compile_eval(p.model, p.method, cfg, p.mesh, p.trainable, p.frozen)
    if method != "model" or model == "tiny-gpt2":
        aot.compile_decode(p.model, p.method, cfg, p.mesh, p.trainable, p.frozen)


def test_plan_memory_is_the_target_compiles(tiny, targets):
    """ptjax plan --target h100 reports the H100 executable's own memory analysis (no CPU
    correction: XLA's GPU backend keeps bf16 weights as they are)."""
    cfg = _cfg(tiny, "tiny-t5", "prompt", 5)
    for name in ("h100", "v5e"):
        got = plan(cfg, target=targets[name])
        compiled = compile_plan(cfg, target=targets[name]).compiled
        assert got["per_device"]["peak"] == aot.compiled_peak(compiled)
        assert got["per_device"]["cpu_weight_upcast"] == 0
        assert got["device_memory"] == targets[name].memory
        assert got["target"] == str(targets[name])


def test_remat_auto_decides_against_the_targets_memory(tiny, targets):
    """model.remat=auto compiles for the target and keeps the first policy that fits its
    memory: none on a real H100 for a tiny model, full when told the device is tiny."""
    cfg = _cfg(tiny, "tiny-t5", "prompt", 1, **{"model__remat": "auto",
                                                 "task__max_input_length": 256})
    assert plan(cfg, target=targets["h100"])["remat"] == "none"
    tight = plan(cfg, device_memory=1.0, target=targets["h100"])
    assert tight["remat"] == "full" and set(tight["remat_tried"]) == {"none", "dots", "full"}


def test_plan_target_from_the_command_line(tiny, capsys):
    args = ["plan", "model.path=tiny-t5", f"model.tiny_dir={tiny}", "prompt.length=8",
            "task.max_input_length=24", "train.batch_size=8", "model.dtype=bfloat16",
            "train.dropout=0", "train.attention_dropout=0"]
    assert cli.main(args + ["--target", "h100"]) == 0
    out = capsys.readouterr().out
    assert "eval step peak" in out and "decoding peak" in out
    assert "compiled for h100 1 (1 x NVIDIA H100 80GB HBM3)" in out
    assert "attention cudnn" in out and "device memory 79.11 GiB (h100's memory): fits" in out
    assert cli.main(args + ["--target", "tpu-v5e", "--topology", "2x2", "mesh.data=4"]) == 0
    assert "4 x TPU v5 lite" in capsys.readouterr().out
    assert cli.main(args + ["--target", "h7"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ptjax: error: --target 'h7' is not a known accelerator; valid: h100, h200, a100, "
        "tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e")


def test_every_target_can_be_described():
    for name, topology, n in [("h200", "", 1), ("a100", "2x4", 8), ("tpu-v4", "2x2x1", 4),
                              ("tpu-v5p", "", 1), ("tpu-v6e", "2x2", 4)]:
        t = describe(name, topology)
        assert len(t.devices) == n and t.memory > 10 * 2 ** 30, name


def test_the_flops_do_not_depend_on_the_target(tiny, targets):
    """FLOPs are counted on the step lowered for one CPU device (every layer, attention as
    dots), so a GPU target, whose executables have no cost analysis, gets them too."""
    cfg = _cfg(tiny, "tiny-t5", "prompt", 1)
    on_h100 = plan(cfg, target=targets["h100"])["flops_per_step"]
    assert on_h100 > 0 and on_h100 == plan(cfg)["flops_per_step"]


def test_a_step_the_tpu_refuses_is_one_line(tiny, capsys):
    """libtpu refuses, while compiling, a step bigger than the chip's HBM (a GPU compiles
    it): model.remat=auto counts each refused policy as not fitting and moves on, and
    ptjax plan ends in one line saying the step does not fit, not in a traceback."""
    args = ["plan", "model.path=tiny-t5", f"model.tiny_dir={tiny}", "prompt.length=8",
            "task.max_input_length=1024", "train.batch_size=4096", "model.dtype=bfloat16",
            "train.dropout=0", "train.attention_dropout=0", "model.remat=auto",
            "--target", "tpu-v5e"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptjax: error: the train step (model.remat=full) does not fit: the "
                          "TPU compiler refuses it (its temporaries alone take ")
    assert "\n" not in err and "of the chip's 15.75 GiB" in err
