"""Where a run's files go: a local path, or object storage that fsspec knows (``gs://``
through gcsfs, the ``gcs`` extra; ``s3://`` etc. with their own fsspec client).

Local paths keep their plain ``os`` calls and need nothing new. For a remote path:

- a directory is a prefix: ``makedirs`` creates nothing, ``isdir`` asks whether any
  object lies under it;
- ``write_bytes`` / ``write_text`` upload one object, which the store replaces whole (a
  killed writer leaves the old object or the new one, never half), as ``os.replace`` does
  for a local file;
- ``move`` is a copy, then a delete (object stores have no rename);
- ``staged_dir`` gives writers that need a local directory (exports, TensorBoard) one, and
  ``upload_tree`` copies it up, file by file;
- ``create_exclusive`` / ``remove`` with a generation are the run lock's primitives: on
  GCS a create with ``ifGenerationMatch=0`` (refused when the object exists) and a delete
  with ``ifGenerationMatch=<generation>`` (refused when it was replaced since).

orbax / tensorstore write checkpoints to the same URLs themselves. Where gcsfs is
installed, importing this module sets ``EPATH_USE_TF=false`` (unless it is set):
etils.epath, through which orbax lists and finalises checkpoints, then uses fsspec /
gcsfs like ptjax rather than ``tf.io.gfile`` whenever TensorFlow happens to be installed
(the ``tfds`` extra), so one client, with one set of credentials, serves every path of a
run. It is set at import because etils decides once, at the first path it sees (a local
one included), and keeps that choice for the process.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile

from ptjax.errors import PtjaxError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
if importlib.util.find_spec("gcsfs") is not None:  # else TFDS keeps tf.io.gfile for gs://
    os.environ.setdefault("EPATH_USE_TF", "false")


def is_remote(path) -> bool:
    """A URL (``gs://bucket/runs/x``), not a local path."""
    return bool(_URL.match(str(path)))


def _fs(path: str):
    """(fsspec file system, its path for ``path``) with fresh listings: tensorstore
    writes orbax's arrays through another client, so a cached listing could miss them.
    For gs:// the very instance etils.epath gives orbax (``finalize_on_close=True``), so
    that what ptjax changes (a checkpoint moved aside) orbax lists afresh too."""
    try:
        import fsspec  # noqa: PLC0415 (optional: fsspec comes with the gcs extra)
        if path.startswith(("gs://", "gcs://")):
            fs = fsspec.filesystem("gcs", finalize_on_close=True)
            key = fsspec.core.strip_protocol(path)
        else:
            fs, key = fsspec.core.url_to_fs(path)
    except ImportError as e:
        raise PtjaxError(f"{path}: reading and writing this URL needs its fsspec client "
                         f"({str(e).splitlines()[0]}); for gs:// pip install 'ptjax[gcs]'") \
            from None
    except ValueError as e:  # "Protocol not known: ..."
        raise PtjaxError(f"{path}: {str(e).splitlines()[0]}; give a local path or a gs:// "
                         "URL") from None
    fs.invalidate_cache()
    return fs, key


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, key = _fs(path)
    return fs.exists(key)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, key = _fs(path)
    return fs.isdir(key)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, key = _fs(path)
    return fs.isfile(key)


def makedirs(path: str):
    """A local directory and its parents; nothing on object storage (prefixes need no
    creating, and gcsfs would create a missing bucket)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """The names directly under ``path`` (files and directories), sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    fs, key = _fs(path)
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(key, detail=False))


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, key = _fs(path)
    return fs.cat_file(key)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes):
    """Atomic: a writer killed midway leaves the old file (object) or the new one."""
    if is_remote(path):
        fs, key = _fs(path)
        fs.pipe_file(key, data)
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str):
    write_bytes(path, text.encode("utf-8"))


def move(src: str, dst: str):
    """``src`` (a file or a directory) to ``dst``: one rename locally; on object storage
    a copy, then a delete, so a kill in between leaves it in both places."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    fs, key = _fs(src)
    _, target = _fs(dst)
    fs.copy(key, target, recursive=True)
    fs.rm(key, recursive=True)


def upload_tree(local_dir: str, url: str):
    """Every file under ``local_dir`` to the same relative path under ``url``."""
    fs, key = _fs(url)
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            fs.put_file(path, f"{key.rstrip('/')}/{rel}")


@contextlib.contextmanager
def staged_dir(path: str):
    """A local directory to write ``path``'s files in: ``path`` itself when it is local,
    else a temporary one uploaded to ``path`` when the block ends without an error."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="ptjax-stage-")
    try:
        yield tmp
        upload_tree(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_remote_dir(path: str, key: str):
    """One line, before any work, if the URL ``path`` cannot be a directory ptjax writes
    in: no client for it, its bucket missing or unreachable, an object at that name."""
    fs, where = _fs(path)
    bucket = where.split("/")[0]
    try:
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise PtjaxError(f"{key}={path}: bucket {bucket!r} not found") from None
        except PermissionError:  # credentials may write objects without reading the
            pass  # bucket's own metadata (roles/storage.objectAdmin)
        if where.rstrip("/") != bucket and fs.isfile(where):
            raise PtjaxError(f"{key}={path}: is an object (a file), not a directory")
    except PtjaxError:
        raise
    except Exception as e:  # noqa: BLE001 (credentials, network: each client its own kind)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PtjaxError(f"{key}={path}: cannot be reached ({why})") from None


def create_exclusive(path: str, data: bytes):
    """Create the object ``path`` only if none exists: its generation (a number the store
    gives each version; "" where it has none), or None when it exists already. On GCS
    one request with ``ifGenerationMatch=0``: of two creators, exactly one succeeds.
    Other stores: their fsspec client's "create" mode, which may check, then write."""
    fs, key = _fs(path)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return None
    return generation(path) or ""


def generation(path: str) -> str | None:
    """The object's generation, or None when there is no object at ``path``."""
    fs, key = _fs(path)
    try:
        info = fs.info(key)
    except FileNotFoundError:
        return None
    return str(info.get("generation") or "")


def remove(path: str, generation: str | None = None) -> bool:
    """Delete one object; with ``generation``, only that version of it (on GCS, a delete
    with ``ifGenerationMatch``: refused when the object was replaced since). True when
    deleted, False when it was gone or had been replaced."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            return True
        return False
    fs, key = _fs(path)
    try:
        if generation and "gs" in fs.protocol:
            bucket, name = key.split("/", 1)
            fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=generation)
        else:
            fs.rm_file(key)
    except (FileNotFoundError, FileExistsError):  # gcsfs: 404, 412 (precondition failed)
        return False
    return True
