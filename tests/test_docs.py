"""Documentation that cannot drift: the config reference is generated from the
dataclasses (tools/docgen.py) and must equal the committed docs/config.md."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docgen():
    spec = importlib.util.spec_from_file_location("docgen", os.path.join(ROOT, "tools",
                                                                         "docgen.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_generated_from_the_dataclasses():
    from ptjax.config import all_keys

    text = _docgen().config_reference()
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == text, "docs/config.md is stale: python tools/docgen.py config"
    for key in all_keys():  # every key documented, including ones added later
        assert f"| `{key}` |" in text


def test_readme_results_check_tolerates_rounding_not_a_changed_result():
    """make check-docs: a rerun's numbers may move by up to 2 points (a flipped dev example,
    another CPU's rounding), not more, and the rows and words must be the same."""
    docgen = _docgen()
    block = "Made on CPU A\n| 20 | 77.7 +/- 7.2 | 67.6 +/- 8.3 |\nensemble 85.9"
    assert docgen.same_results(block, block.replace("77.7", "78.5").replace("CPU A", "B"))
    assert not docgen.same_results(block, block.replace("77.7", "80.0"))
    assert not docgen.same_results(block, block.replace("| 20 |", "| 8 |"))
    assert not docgen.same_results(block, block + "\n| 2 | 56.2 +/- 0.0 |")
