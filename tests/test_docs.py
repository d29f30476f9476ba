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
