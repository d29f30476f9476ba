"""Documentation that cannot drift: the config reference is generated from the
dataclasses (tools/docgen.py) and must equal the committed docs/config.md."""
import glob
import importlib.util
import os
import re

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


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_the_docs_say_how_ptjax_gets_on_the_path():
    """Issue 31: `make demo` does not activate .venv, so a bare `ptjax` is not found; the
    README and getting started say to activate it (before their first bare `ptjax`), and
    getting started writes the command one way."""
    for page in ("README.md", "docs/getting-started.md"):
        bash = "".join(re.findall(r"^```bash\n(.*?)^```", _read(page), re.S | re.M))
        assert "source .venv/bin/activate" in bash, page
        first = re.search(r"^ptjax ", bash, re.M)
        assert first is None or bash.index("source .venv/bin/activate") < first.start(), page
    assert ".venv/bin/ptjax " not in re.sub(r"`[^`]*`", "", _read("docs/getting-started.md"))


def test_the_readme_and_getting_started_list_the_same_test_extras_and_size():
    """Issue 31: the two pages named different test extras, and neither the 3.8 GB venv."""
    def extras(page):
        block = re.search(r"make test +adds the test extras(?: to \.venv)? \(([^)]*)\)",
                          " ".join(_read(page).replace("#", " ").split()))
        return block and block.group(1)

    assert extras("README.md") and extras("README.md") == extras("docs/getting-started.md")
    for word in ("torch", "PEFT", "TFDS", "TensorFlow", "W&B"):  # setup.cfg's test extra
        assert word in extras("README.md")
    for page in ("README.md", "docs/getting-started.md", "docs/install.md"):
        assert "3.8 GB" in _read(page), page


def test_the_docs_do_not_say_templates_are_missing():
    """Issue 31: methods.md said P-tuning's template positions were 'not yet in ptjax'."""
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        assert "not yet in ptjax" not in _read(page), page


def test_make_installs_print_no_setuptools_banner():
    """Issue 31: `pip install -q -e .` shows setuptools' 11-line editable-install banner
    (a warning); the Makefile's editable installs are -qq, which still prints errors
    (measured: a failing build still says why)."""
    lines = [x for x in _read("Makefile").splitlines() if "pip install" in x and " -e " in x]
    assert len(lines) == 4 and all(" -qq " in x for x in lines), lines  # + .venv-targets
