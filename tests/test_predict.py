"""benchmarks/predict.py: the paper's shapes predicted for accelerators this machine does
not have. Here on the built-in tiny T5 for one H100 (a compile of seconds): the JSON's
fields, the remat=auto row made from the none row's compile, a failing row recorded and
the run going on, the table; and the rules that pick meshes and read libtpu's refusals.

Runs in the targets venv (``make test-targets``), like tests/test_targets.py.
"""
import json
import math
import os
import sys

import jax
import pytest

from ptjax import aot
from ptjax.errors import PtjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import predict  # noqa: E402

pytestmark = pytest.mark.targets
GiB = 1024 ** 3


@pytest.fixture(autouse=True, scope="module")
def no_compilation_cache():
    """Executables for compile-only devices cannot be read back from XLA's cache."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


def test_predict_writes_rows_for_a_target(tmp_path, capsys):
    out = tmp_path / "predict.json"
    args = ["--sizes", "tiny-t5", "--targets", "h100,h100:0", "--methods", "prompt",
            "--prompts", "1", "--remat", "none,auto", "--out", str(out), "--markdown",
            "--set", f"model.tiny_dir={tmp_path}", "--set", "task.max_input_length=24",
            "--set", "task.max_target_length=4", "--set", "train.batch_size=8",
            "--set", "prompt.length=8"]
    assert predict.main(args) == 0
    result = json.loads(out.read_text())
    assert "not measurements" in result["what"]
    assert result["versions"]["jax"] == jax.__version__
    assert {"jaxlib", "libtpu", "jax-cuda12-plugin", "nvidia-cudnn-cu12"} <= set(
        result["versions"])
    assert len(result["ptjax"]["commit"]) == 40
    assert result["skipped"] == []
    rows = {(r["target"], r["remat_setting"]): r for r in result["rows"]}
    assert set(rows) == {("h100", "none"), ("h100", "auto"), ("h100:0", "none"),
                         ("h100:0", "auto")}
    none, auto = rows["h100", "none"], rows["h100", "auto"]
    for r in (none, auto):
        assert r["status"] == "ok" and r["fits"] is True
        assert r["devices"] == "1 x NVIDIA H100 80GB HBM3"
        assert r["mesh"] == {"data": 1, "model": 1, "fsdp": False}
        assert 0 < r["per_device"]["accelerator_peak"] < GiB
        assert r["per_device"]["accelerator_peak"] == r["per_device"]["peak"]  # no CPU copy
        assert r["device_memory"] > 79 * GiB
        assert r["flops_per_step"] > 0
        assert r["flops_per_step_per_device"] == r["flops_per_step"]
        assert r["compile_s"] > 0 and r["attention"] == "cudnn"
        assert r["remat"] == "none"
    # auto's choice came from the none row's compile, not a second one
    assert auto["remat_tried"] == {"none": none["per_device"]["accelerator_peak"]}
    assert auto["compile_s"] == none["compile_s"]
    # a row that cannot run is recorded with its one-line error, the others still run
    bad = rows["h100:0", "none"]
    assert bad["status"] == "error" and "--topology '0'" in bad["error"]
    assert "\n" not in bad["error"]
    table = capsys.readouterr().out
    line = [x for x in table.splitlines() if x.startswith("| tiny-t5 | prompt | 1 | h100 |")]
    assert len(line) == 1 and "fits | none: " in line[0] and line[0].count("|") == 14
    assert line[0].endswith(f"| {result['ptjax']['commit'][:7]} |") or line[0].endswith(
        f"| {result['ptjax']['commit'][:7]}+ |")  # the commit column (+: ptjax/ modified)
    assert "| tiny-t5 | prompt | 1 | h100:0 | error: PtjaxError: --topology '0'" in table
    assert predict.main(["--table", str(out)]) == 0
    assert line[0] in capsys.readouterr().out


def _row(size, target, remat, status="ok", **kw):
    row = {"size": size, "model": predict.model_name(size), "target": target,
           "method": "prompt", "prompts": 1, "remat_setting": remat, "status": status}
    if status == "ok":
        row.update(mesh={"data": 4, "model": 1, "fsdp": False}, remat="none", fits=True,
                   per_device={"accelerator_peak": 2 * GiB}, device_memory=16 * GiB,
                   flops_per_step=1e12, flops_per_step_per_device=2.5e11, compile_s=3.0,
                   compile_s_tried={"none": 3.0})
    else:
        row["error"] = "PtjaxError: libtpu cannot describe it"
    return dict(row, **kw)


def test_merge_keeps_each_rows_commit_and_replaces_errors(tmp_path, capsys):
    """Runs of parts of the matrix made at different commits: the merged table names, per
    row, the ptjax that compiled it; a row that ran replaces one that failed."""
    old = {"ptjax": {"commit": "a" * 40}, "command": "predict.py RUN1", "rows": [
        _row("small", "v5e-2x2", "none"), _row("base", "v5e-2x2", "none", status="error")]}
    new = {"ptjax": {"commit": "b" * 40}, "command": "predict.py RUN2", "rows": [
        _row("base", "v5e-2x2", "none", commit="bbbbbbb"),
        _row("small", "v5e-2x2", "auto", commit="bbbbbbb")]}
    paths = []
    for name, got in (("old", old), ("new", new)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(got, f)
    out = tmp_path / "merged.json"
    assert predict.main(["--merge", *paths, "--sizes", "small,base", "--targets", "v5e-2x2",
                         "--methods", "prompt", "--prompts", "1", "--remat", "none,auto",
                         "--out", str(out), "--markdown"]) == 0
    merged = json.loads(out.read_text())
    assert [(r["size"], r["remat_setting"], r["status"], r["commit"]) for r in
            merged["rows"]] == [("small", "none", "ok", "aaaaaaa"),
                                ("small", "auto", "ok", "bbbbbbb"),
                                ("base", "none", "ok", "bbbbbbb")]
    assert [r["command"] for r in merged["runs"]] == ["predict.py RUN1", "predict.py RUN2"]
    assert [(r["size"], r["remat_setting"]) for r in merged["skipped"]] == [("base", "auto")]
    table = capsys.readouterr().out
    assert "| small | prompt | 1 | v5e-2x2 | 4 x 1 | 2.0 fits | none: 2.0 fits |" in table
    # a line whose remat rows came from two runs names both commits
    assert [x.rsplit("|", 2)[1].strip() for x in table.splitlines() if x.startswith(
        ("| small", "| base"))] == ["aaaaaaa / bbbbbbb", "bbbbbbb"]


def test_the_matrix_and_its_order():
    rows = predict.matrix(predict.SIZES, list(predict.TARGETS), list(predict.METHODS),
                          [1, 5], ["none", "auto"])
    assert len(rows) == 5 * 4 * (2 + 2 + 1) * 2  # model tuning: K=1 only
    # prompt tuning K=1 on one H100 comes first, for every size
    first = [(r["size"], r["target"], r["method"], r["prompts"]) for r in rows[:10]]
    assert first == [(s, "h100", "prompt", 1) for s in predict.SIZES for _ in range(2)]
    # then every GPU row before any TPU row
    tpu = [i for i, r in enumerate(rows) if r["target"].startswith(("v5e", "v4"))]
    assert min(tpu) == len(rows) - len(tpu)


def test_choose_mesh():
    h100 = 79 * GiB
    assert predict.choose_mesh(1, 11_000_000_000, "prompt", h100)[0] == {
        "data": 1, "model": 1, "fsdp": False}
    # bf16 T5-base replicated on 8 GPUs; T5-XXL's 20.7 GiB split over a v5e 2x2
    assert predict.choose_mesh(8, 250_000_000, "prompt", h100)[0]["data"] == 8
    assert predict.choose_mesh(4, 11_135_000_000, "prefix", 16 * GiB)[0] == {
        "data": 1, "model": 4, "fsdp": False}
    # model tuning: FSDP once the fp32 state is more than a quarter of a device
    assert predict.choose_mesh(8, 250_000_000, "model", h100)[0]["fsdp"] is False
    assert predict.choose_mesh(8, 2_850_000_000, "model", h100)[0] == {
        "data": 8, "model": 1, "fsdp": True}


def test_tpu_refusal_is_read_as_not_fitting():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (21.58G) exceeds available HBM (15.75G).")
    assert aot.refused_bytes(msg) == pytest.approx(21.58 * GiB)
    assert aot.refused_bytes("INVALID_ARGUMENT: something else") is None

    def refused():
        raise jax.errors.JaxRuntimeError(msg)
    # ptjax plan's one line for the same refusal (what compile_plan raises) still counts
    with pytest.raises(PtjaxError, match="the train step does not fit") as e:
        aot.check_fits(refused, "the train step")
    assert aot.refused_bytes(e.value) == pytest.approx(21.58 * GiB)


def test_the_slice_search_tells_a_failed_compile_from_one_that_does_not_fit(monkeypatch):
    """Up the ladder, a slice libtpu refuses does not hold the row and the search goes on;
    a compile that fails for another reason ends it, and the table says the search failed
    instead of "none of" the slices (which would claim they were too small)."""
    p = predict.Predictor([])

    class Slice:  # chips of 16 GiB, no compile behind them
        def __init__(self, topology):
            self.topology, self.memory = topology, 16 * GiB
            self.devices = [None] * math.prod(int(n) for n in topology.split("x"))

    said = {}
    monkeypatch.setattr(p, "target", lambda name, topology: Slice(topology))
    monkeypatch.setattr(p, "count", lambda row: 3 * 10 ** 9)
    monkeypatch.setattr(p, "compile", lambda row, target, mesh, policy: said[target.topology])
    row = {"method": "prefix", "remat_setting": "auto"}
    result = {"target_name": "tpu-v5e", "topology": "2x2"}

    def cell(search):
        return predict._slice({"auto": dict(status="ok", fits=False, smallest_slice=search,
                                            target_name="tpu-v5e")})

    refused = {"oom": 20 * GiB, "error": "RESOURCE_EXHAUSTED: ...", "compile_s": 1.0}
    said.update({"2x4": refused, "4x4": {"error": "INVALID_ARGUMENT: boom", "compile_s": 1.0}})
    s = p.smallest_slice(row, result, max_up=2)
    assert s["topology"] is None and s["tried"] == ["2x4", "4x4"] and "boom" in s["error"]
    assert s["outcomes"]["2x4"]["refused_at_least"] == 20 * GiB
    assert cell(s) == "search failed on 4x4 (see the JSON)"

    said["4x4"] = refused
    s = p.smallest_slice(row, result, max_up=2)
    assert "error" not in s and cell(s) == "none of 2x4, 4x4"

    said["4x4"] = {"estimate": 9 * GiB, "devices": "16 x TPU v5 lite", "compile_s": 2.0}
    s = p.smallest_slice(row, result, max_up=2)
    assert s["topology"] == "4x4" and s["outcomes"]["4x4"]["peak"] == 9 * GiB
    assert cell(s) == "tpu-v5e 4x4 (remat full, 9.0 GiB)"
