"""`ptjax plan`: the compiled step's memory per device, without loading weights; the
paper's checkpoint sizes known offline."""
import math

import jax
import pytest

from ptjax import cli
from ptjax.config import from_dict
from ptjax.models.hf_config import architecture
from ptjax.models.model import abstract_params
from ptjax.plan import GiB, parse_bytes, plan


@pytest.mark.parametrize("name, millions", [
    ("google/t5-small-lm-adapt", 77.0), ("google/t5-base-lm-adapt", 247.6),
    ("google/t5-large-lm-adapt", 783.2), ("google/t5-xl-lm-adapt", 2849.8),
    ("google/t5-xxl-lm-adapt", 11135.3), ("google/t5-v1_1-base", 247.6), ("gpt2", 124.4)])
def test_known_checkpoints_need_no_download(name, millions):
    """Parameter counts of the paper's sizes (77M ... 11B), from shapes alone."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(architecture(name))))
    assert round(n / 1e6, 1) == millions


def _cfg(tmp_path, **kw):
    base = {"model": {"path": "tiny-t5", "tiny_dir": str(tmp_path)},
            "prompt": {"length": 8, "seeds": [0, 1]},
            "task": {"max_input_length": 64, "max_target_length": 4},
            "train": {"batch_size": 16, "dropout": 0.0}}  # dropout triples compile time
    for key, value in kw.items():
        section, name = key.split(".")
        base.setdefault(section, {})[name] = value
    return from_dict(base)


@pytest.mark.mesh
def test_plan_counts_what_each_device_holds(tmp_path):
    one = plan(_cfg(tmp_path, **{"mesh.data": 1}))
    d = one["per_device"]
    params = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(
        abstract_params(architecture(str(tmp_path / "tiny-t5")))))
    assert d["frozen_weights"] == params and one["parameters"] * 4 == params
    # K=2 prompts [8, 64] fp32 + Adafactor's [8] and [64] factored... or full moments
    assert 2 * 8 * 64 * 4 <= d["trainable_and_optimizer"] <= 4 * 2 * 8 * 64 * 4
    assert d["peak"] >= d["frozen_weights"] + d["temporaries"]
    assert one["fits"] is True and d["accelerator_peak"] == d["peak"]  # fp32: no upcast
    # tensor parallel over 4 devices: each holds a fraction of the weights
    tp = plan(_cfg(tmp_path, **{"mesh.data": 2, "mesh.model": 4}))
    assert tp["per_device"]["frozen_weights"] < 0.5 * params
    # model tuning carries fp32 weights and Adam's two moments in its state
    mt = plan(_cfg(tmp_path, **{"mesh.data": 1, "train.method": "model", "prompt.seeds": [0],
                                "optim.name": "adam"}))
    assert mt["per_device"]["frozen_weights"] == 0
    assert mt["per_device"]["trainable_and_optimizer"] >= 3 * params
    # ... and on a (2, 4) mesh the moments are sharded like the weights they mirror
    mt_tp = plan(_cfg(tmp_path, **{"mesh.data": 2, "mesh.model": 4, "method.name": "model",
                                   "prompt.seeds": [0], "optim.name": "adam"}))
    assert mt_tp["per_device"]["trainable_and_optimizer"] < \
        0.5 * mt["per_device"]["trainable_and_optimizer"]


def _compiled_flops(tmp_path, cfg, unroll: bool) -> float:
    """The reference count: the step compiled on CPU (not just lowered), layers unrolled
    or scanned, read from XLA's cost analysis."""
    from ptjax import methods
    from ptjax.aot import compile_step, with_shardings
    from ptjax.models.model import Model, param_shardings
    from ptjax.sharding import logical_rules, make_mesh

    mesh = make_mesh(1, 1)
    config = architecture(str(tmp_path / "tiny-t5"))
    model = Model(config=config, params=None, mesh=mesh, unroll_layers=unroll,
                  attention="xla")
    method = methods.build(cfg, config)
    rules = logical_rules(False)
    frozen = with_shardings(abstract_params(config), param_shardings(config, mesh, rules))
    trainable = with_shardings(method.shapes(), method.shardings(method.shapes(), mesh, rules))
    compiled = compile_step(model, method, cfg, mesh, trainable, frozen)[0]
    return float(compiled.cost_analysis()["flops"])


def test_plan_counts_every_layer_of_the_step(tmp_path):
    """Issue 30, finding 3: XLA's cost analysis counts a scanned layer body once, so the
    FLOPs were ~L times low; plan's count is the unrolled step's (tiny T5: 2 + 2 layers)."""
    cfg = _cfg(tmp_path, **{"mesh.data": 1})
    got = plan(cfg)["flops_per_step"]
    unrolled = _compiled_flops(tmp_path, cfg, unroll=True)
    scanned = _compiled_flops(tmp_path, cfg, unroll=False)
    assert got == pytest.approx(unrolled, rel=0.02)
    assert got > 1.5 * scanned


def test_remat_and_bf16_shrink_the_plan(tmp_path):
    kw = {"mesh.data": 1, "task.max_input_length": 256, "train.batch_size": 32}
    none = plan(_cfg(tmp_path, **kw))["per_device"]
    full = plan(_cfg(tmp_path, **kw, **{"model.remat": "full"}))["per_device"]
    assert full["temporaries"] < 0.7 * none["temporaries"]
    bf16 = plan(_cfg(tmp_path, **kw, **{"model.dtype": "bfloat16"}))
    assert bf16["per_device"]["frozen_weights"] * 2 == none["frozen_weights"]
    # on CPU the fp32 copy of bf16 weights is named and taken out of the estimate
    assert bf16["per_device"]["cpu_weight_upcast"] == none["frozen_weights"]


def test_plan_command_says_whether_it_fits(tmp_path, capsys):
    args = ["plan", "model.path=tiny-t5", f"model.tiny_dir={tmp_path}", "prompt.length=8",
            "task.max_input_length=32", "train.batch_size=8", "mesh.data=1", "train.dropout=0"]
    assert cli.main(args + ["--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "device memory 80.00 GiB (--device-memory): fits" in out
    # the command also compiles the eval step and decoding for the same devices
    assert "eval step peak" in out and "decoding peak" in out
    assert cli.main(args + ["--device-memory", "1000"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert cli.main(args + ["--device-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ptjax: error: --device-memory 'lots' is not a size; give e.g. 80GB or 24GiB"


def test_plan_with_cudnn_off_a_gpu_is_one_line(tmp_path, capsys):
    """Issue 30, finding 4: jax's raw 'cuDNN is not detected' became ptjax's line."""
    args = ["plan", "model.path=tiny-t5", f"model.tiny_dir={tmp_path}", "prompt.length=8",
            "task.max_input_length=32", "train.batch_size=8", "mesh.data=1",
            "model.dtype=bfloat16", "model.attention=cudnn", "train.attention_dropout=0"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ptjax: error: model.attention=cudnn needs an NVIDIA GPU, and this step is "
                   "compiled for cpu; use model.attention=auto (cuDNN where it can serve) or "
                   "xla, or plan for a GPU: ptjax plan --target h100"]


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * GiB == parse_bytes("80 GiB")
    assert parse_bytes("1e9") == 1e9


@pytest.mark.slow
def test_plan_covers_every_method(tmp_path):
    """Prefix tuning and P-tuning: frozen weights plus each member's own parameters and
    their optimizer state; a prefix's MLP (h=512 by default) outweighs a soft prompt."""
    def cfg(**kw):
        return _cfg(tmp_path, **{"mesh.data": 1, **kw})
    prompt = plan(cfg())
    prefix = plan(cfg(**{"method.name": "prefix"}))
    ptuning = plan(cfg(**{"method.name": "ptuning"}))
    D, P, h = 64, 8, 512
    assert prompt["trainable_parameters_per_member"] == P * D
    # tiny T5: 2 encoder + 2 decoder layers, 4 heads x d_kv 16: three sites of 2 layers
    out = 2 * 2 * 4 * 16
    assert prefix["trainable_parameters_per_member"] == 3 * (P * D + D * h + h + h * out + out)
    assert ptuning["trainable_parameters_per_member"] == P * D + 2 * (D * D + D) + D * D + D
    for p in (prefix, ptuning):
        assert p["method"] in ("prefix", "ptuning") and p["prompts"] == 2
        assert p["per_device"]["frozen_weights"] == prompt["per_device"]["frozen_weights"]
        assert p["per_device"]["trainable_and_optimizer"] > \
            prompt["per_device"]["trainable_and_optimizer"]
