"""The paper's tasks from Hugging Face ``datasets`` (Parquet / Arrow), with no TensorFlow.

``task.source=hf`` reads a TFDS task (``ptjax.data.tasks.TFDS_TASKS``) from the hub
dataset that holds the same data: SuperGLUE from ``aps/super_glue``, GLUE from
``nyu-mll/glue``, SQuAD from ``rajpurkar/squad`` (``HUB``). The hub's rows have the TFDS
features' names and nesting (``idx`` dicts, ReCoRD's entity lists, SQuAD's
``answers: {text, answer_start}``), and a ClassLabel ``label`` whose names are TFDS's, so
``ptjax.data.formats.format_example`` takes them as they are (tested equal to the TFDS
path's examples on the same data).

``task.hf_path``: "" reads each task's hub dataset (through the ``datasets`` cache,
``HF_HOME``); a hub id reads that dataset instead (a mirror with the same configs); a
local directory holds the hub's Parquet layout, ``<dir>/<config>/<split>-*.parquet``
(``boolq/train-00000-of-00001.parquet``), or the same under ``<dir>/<dataset>/`` (e.g.
``<dir>/super_glue/boolq/...``), so one directory can hold SuperGLUE, GLUE and SQuAD.
``.arrow`` files and the hub's converted layout ``<config>/<split>/0000.parquet`` are
read too.
"""
from __future__ import annotations

import glob
import os

from ptjax.errors import PtjaxError
from ptjax.models.checkpoint_files import first_line, hub_unreachable

# TFDS dataset -> (hub dataset id, config): the config is the folder of the hub's Parquet
# files. MRQA is not here: the hub has it as one dataset whose rows name their source.
HUB = {
    **{f"super_glue/{c}": ("aps/super_glue", c)
       for c in ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc.fixed")},
    **{f"glue/{c}": ("nyu-mll/glue", c) for c in ("mrpc", "qqp", "sst2")},
    "squad/v1.1": ("rajpurkar/squad", "plain_text"),
}
# Where a split's files lie under a config folder: the hub's own layout first, then the
# layout of its Parquet conversion (refs/convert/parquet).
LAYOUTS = ("{split}-*.{ext}", "{split}/*.{ext}")


def _datasets():
    try:
        import datasets  # noqa: PLC0415 (optional: the hf extra)
    except ImportError:
        raise PtjaxError("task.source=hf needs Hugging Face datasets (not installed): "
                         "pip install -e '.[hf]'") from None
    return datasets


def even_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of ``n_shards`` contiguous shards of n rows, as ``tfds.even_splits``
    cuts them: the first n % n_shards shards hold one row more (11 rows in 3: 4, 4, 3), so
    the same rows in the same order make the same shards from either source (but TFDS
    stores a split shuffled, the hub in the original order: docs/data.md)."""
    size, extra = divmod(n, n_shards)
    starts = [q * size + min(q, extra) for q in range(n_shards + 1)]
    return list(zip(starts[:-1], starts[1:]))


def source(name: str, tfds_name: str, hf_path: str) -> tuple[str, str]:
    """(hub id or local directory, config) that task ``name`` is read from."""
    if tfds_name not in HUB:
        raise PtjaxError(f"task {name!r} has no Hugging Face source (task.source=hf reads "
                         f"{', '.join(sorted({t.split('/')[0] for t in HUB}))}); use "
                         "task.source=tfds")
    repo, config = HUB[tfds_name]
    return (os.path.expanduser(hf_path) if hf_path else repo), config


def local_files(root: str, repo: str, config: str, split: str) -> list[str]:
    """A split's Parquet (else Arrow) files under ``root`` in the hub's layout, sorted:
    ``root/config/`` or ``root/<dataset name>/config/``."""
    for folder in (os.path.join(root, config), os.path.join(root, repo.split("/")[-1], config)):
        for ext in ("parquet", "arrow"):
            for layout in LAYOUTS:
                found = sorted(glob.glob(os.path.join(
                    glob.escape(folder), layout.format(split=split, ext=ext))))
                if found:
                    return found
    return []


def read_split(name: str, tfds_name: str, hf_path: str, split: str):
    """One split of task ``name`` as a ``datasets.Dataset`` (memory-mapped Arrow)."""
    where, config = source(name, tfds_name, hf_path)
    datasets = _datasets()
    if os.path.isdir(where):
        files = local_files(where, HUB[tfds_name][0], config, split)
        if not files:
            raise PtjaxError(
                f"task {name!r}: no {split} files in {where} (looked for "
                f"{config}/{split}-*.parquet, as the hub lays out "
                f"{HUB[tfds_name][0]}); download them with `hf download "
                f"{HUB[tfds_name][0]} --repo-type dataset --include '{config}/*' "
                f"--local-dir {where}` or set task.hf_path")
        kind = "parquet" if files[0].endswith(".parquet") else "arrow"
        try:
            return datasets.load_dataset(kind, data_files={split: files}, split=split)
        except Exception as e:  # a damaged or foreign file: reported in one line
            raise PtjaxError(f"task {name!r}: {files[0]} could not be read as {kind} "
                             f"({type(e).__name__}: {first_line(e)})") from None
    if os.path.isabs(where) or where.startswith("."):
        raise PtjaxError(f"task.hf_path={where}: no such directory (give a directory in the "
                         "hub's layout, or a hub dataset id such as aps/super_glue)")
    local = (f"or set task.hf_path to a directory of its files (`hf download {where} "
             f"--repo-type dataset --include '{config}/*' --local-dir DIR`)")
    if not datasets.config.HF_HUB_OFFLINE:
        why = hub_unreachable()  # else datasets retries for ~25 s before it fails
        if why:
            raise PtjaxError(f"task {name!r}: Hugging Face dataset {where} ({config}) cannot "
                             f"be downloaded: {why}; set HF_DATASETS_OFFLINE=1 to read the "
                             f"copy a connected run left in the datasets cache, {local}")
    try:
        return datasets.load_dataset(where, config, split=split)
    except Exception as e:  # offline and not cached, no such dataset or config: one line
        raise PtjaxError(f"task {name!r}: Hugging Face dataset {where} ({config}, {split}) "
                         f"could not be loaded ({type(e).__name__}: {first_line(e)}); load "
                         f"it once where there is network (HF_DATASETS_OFFLINE=1 then reads "
                         f"the cache), {local}") from None


def label_names(ds, name: str, split: str) -> tuple[str, ...]:
    """The class names of a split's ClassLabel ``label`` (read back from the Parquet
    schema's metadata that ``datasets`` and the hub write), or () when it has no label."""
    label = ds.features.get("label")
    if label is None:
        return ()
    names = getattr(label, "names", None)
    if not names:
        raise PtjaxError(f"task {name!r}: the {split} split's column 'label' is {label}, not "
                         "a ClassLabel with class names (the hub's Parquet files keep them "
                         "in their schema metadata, as datasets' Dataset.to_parquet writes)")
    return tuple(names)


def rows(ds, start: int = 0, stop: int | None = None) -> list[dict]:
    """Rows [start, stop) of a split as plain Python dicts (str, int, lists, dicts)."""
    stop = len(ds) if stop is None else stop
    return list(ds if (start, stop) == (0, len(ds)) else ds.select(range(start, stop)))
