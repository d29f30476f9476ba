"""benchmarks/gpu_suite.py runs end to end at tiny shapes on CPU: every case gives a
result row, the JSON is written, and neither tensorflow-datasets nor tensorboardX is
imported (the GPU machine has neither)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1))  # one CPU device, like a one-GPU machine
    # benchmarks/predict.py's output for the tiny K=1 case's shape (a made-up number: the
    # suite joins the row, it does not recompute it)
    predictions = tmp_path / "predict.json"
    predictions.write_text(json.dumps({"rows": [
        {"size": "tiny", "method": "prompt", "prompts": 1, "target": "h100",
         "remat_setting": "auto", "status": "ok", "remat": "none", "fits": True,
         "devices": "1 x NVIDIA H100 80GB HBM3", "flops_per_step": 1e6,
         "per_device": {"accelerator_peak": 12345}}]}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"),
                          "--tiny", "--out", str(tmp_path), "--predictions", str(predictions)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "gpu_suite.json") as f:
        result = json.load(f)
    cases = result["cases"]
    assert [c["framework"] for c in cases] == ["ptjax", "ptjax", "peft"]
    for c in cases:
        assert c["status"] == "ok", c
        assert c["ms_per_step"] > 0 and c["examples_per_s"] > 0 and c["peak_bytes"] > 0
        assert c["lazy_imports_leaked"] == []
    ours = [c for c in cases if c["framework"] == "ptjax"]
    for c in ours:
        assert c["loss_finite"] and c["remat"] == "none" and c["plan_bytes"] > 0
        assert c["compile_s"] > 0
    assert [c["attention"] for c in ours] == ["xla", "einsum"]  # CPU; attention dropout
    # next to each measured peak: the plan for this device, and predict.py's deviceless one
    for c in ours:
        local = c["prediction"]["local"]
        assert local["bytes"] == c["plan_bytes"] and local["remat"] == c["remat"]
    k1, k2 = (c["prediction"]["deviceless"] for c in ours)
    assert k1["bytes"] == 12345 and k1["target"] == "1 x NVIDIA H100 80GB HBM3"
    assert ours[0]["deviceless_over_measured"] == 12345 / ours[0]["peak_bytes"]
    assert "attention_dropout" in k2["missing"]  # not at predict.py's settings
    assert "prediction" not in cases[2]  # PEFT
    assert "tiny K=1 ptjax" in out.stdout
