"""A run's directory: output checks, the lock one process holds on it, the resume guard,
its checkpoints opened for resume, the metrics log and the atomic results file.

    runs/NAME/
      config.yaml        the resolved config (a rerun must match it to resume)
      metrics.jsonl      one row per (step, split, prompt): loss / dev metric
      tb/                TensorBoard events
      checkpoints/       orbax: trainable state + best + data position, never frozen weights
      export/            the best members, as the method exports them
      results.json       best step and metric per member, for notebooks
      damaged-checkpoints/  checkpoints found damaged on resume, moved out of orbax's way

The run directory is the one named when the run starts (a copied or moved run continues
where it is); one process trains it at a time (``RunLock``). It may be a ``gs://`` URL
(``ptjax.storage``): orbax writes the checkpoints there itself, every other file is one
object replaced whole, and the lock is an object created only if absent.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile

import jax
from tensorboardX import SummaryWriter

from ptjax import config as config_lib
from ptjax import preemption, storage
from ptjax.checkpoint import Checkpointer
from ptjax.errors import PtjaxError
from ptjax.models.named import TINY
from ptjax.sharding import initialize_distributed, is_main_process, sync

# Keys a rerun may change and still resume the same run: its length, its display, and
# the devices it runs on (orbax restores into the new mesh's shardings), with the
# microbatches that fit them (the same step up to float rounding) and the steps profiled.
# The run directory is the one named now (a run may be moved or copied), and what is only
# scored after training (zero-shot transfer, the ensemble) may change too.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.wandb", "train.eval_batch_size",
                     "mesh.data", "mesh.model", "mesh.fsdp", "mesh.distributed", "run_dir",
                     "task.transfer", "train.ensemble", "train.ensemble_weighting",
                     "train.ensemble_weights", "train.microbatches", "train.profile_steps")


class MetricsLog:
    """metrics.jsonl + TensorBoard. On resume from step s, rows after s are dropped (and
    TensorBoard purges them) so a resumed run's log equals an uninterrupted one's."""

    def __init__(self, run_dir: str, resume_step: int, enabled_tb: bool = True,
                 names=None, wandb_project: str = "", config=None):
        # TensorBoard / W&B tags name each member by its settings, e.g.
        # train/loss/prompt-P20-class_label-seed0 (metrics.jsonl keeps the index k)
        self.names = list(names) if names else None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._remote = storage.is_remote(run_dir)
        rows = []
        if storage.exists(self.path):
            for raw in io.BytesIO(storage.read_bytes(self.path)):
                try:
                    line = raw.decode("utf-8")
                    keep = json.loads(line)["step"] <= resume_step
                except (ValueError, KeyError, TypeError):  # a line cut by a kill, or
                    continue  # damaged: the rows after resume_step are written again
                if keep:
                    rows.append(line if line.endswith("\n") else line + "\n")
        # atomic: a kill here loses nothing. An object cannot be appended to: a remote
        # log keeps its rows and uploads them whole at each write (replacing the object)
        storage.write_text(self.path, "".join(rows))
        self._rows = rows if self._remote else None
        self._file = None if self._remote else open(self.path, "a")
        self._tb = self._tb_dir = None
        if enabled_tb:
            # tensorboardX writes local files: a remote run's events are written in a local
            # directory and copied up to run_dir/tb at each write
            self._tb_dir = tempfile.mkdtemp(prefix="ptjax-tb-") if self._remote else None
            self._tb = SummaryWriter(self._tb_dir or os.path.join(run_dir, "tb"),
                                     purge_step=resume_step + 1 if resume_step else None)
        self._wandb = _wandb_run(run_dir, wandb_project, config) if wandb_project else None

    def _member(self, k) -> str:
        return self.names[k] if self.names and k < len(self.names) else f"prompt-{k}"

    def write(self, rows):
        for row in rows:
            if self._remote:
                self._rows.append(json.dumps(row) + "\n")
            else:
                self._file.write(json.dumps(row) + "\n")
            scalars = {}
            for key, value in row.items():
                if key in ("step", "split", "prompt") or not isinstance(value, (int, float)):
                    continue
                suffix = f"/{self._member(row['prompt'])}" if "prompt" in row else ""
                scalars[f"{row['split']}/{key}{suffix}"] = value
            if self._tb is not None:
                for tag, value in scalars.items():
                    self._tb.add_scalar(tag, value, row["step"])
            if self._wandb is not None:
                self._wandb.log(scalars, step=row["step"])
        if self._remote:
            storage.write_text(self.path, "".join(self._rows))
            self._upload_tb(flush=True)
        else:
            self._file.flush()

    def _upload_tb(self, flush: bool):
        if self._tb_dir is not None:
            if flush:
                self._tb.flush()
            storage.upload_tree(self._tb_dir, os.path.join(os.path.dirname(self.path), "tb"))

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._upload_tb(flush=False)
            if self._tb_dir is not None:
                shutil.rmtree(self._tb_dir, ignore_errors=True)
        if self._wandb is not None:
            self._wandb.finish()


def member_names(cfg, method) -> list[str]:
    """One name per member from its run's settings: method, prompt length, init, seed."""
    length = "" if method.name in ("model", "design") else f"-P{cfg.prompt.length}"
    names = []
    for k, seed in enumerate(method.seeds):
        init = method.describe(k).get("init")
        names.append(f"{method.name}{length}{'-' + init if init else ''}-seed{seed}")
    return names


def _wandb_run(run_dir: str, project: str, cfg):
    """A W&B run for ``run_dir`` (train.wandb=PROJECT); a resumed run continues the same
    one. WANDB_MODE=offline writes it under run_dir/wandb for a later `wandb sync`."""
    try:
        import wandb  # noqa: PLC0415 (optional: the wandb extra)
    except ImportError:
        raise PtjaxError(f"train.wandb={project!r} needs Weights & Biases: pip install "
                         "'ptjax[wandb]' (or set train.wandb='')") from None
    run_id = hashlib.sha1(storage.absolute(run_dir).encode()).hexdigest()[:12]
    return wandb.init(project=project, name=os.path.basename(run_dir.rstrip("/")), id=run_id,
                      dir=None if storage.is_remote(run_dir) else run_dir, resume="allow",
                      config=config_lib.to_dict(cfg) if cfg is not None else None)


def check_resumable(run_dir: str, cfg):
    path = os.path.join(run_dir, "config.yaml")
    if not storage.exists(path):
        return
    old = config_lib.load_config(path)
    a, b = config_lib.to_dict(old), config_lib.to_dict(cfg)
    for key in config_lib.all_keys():
        if key in RESUMABLE_CHANGES:
            continue
        va, vb = _get(a, key), _get(b, key)
        if va != vb:
            raise PtjaxError(f"{path}: this run was started with {key}={va!r}, not {vb!r}; "
                             "use another run_dir, or the same config to resume it")


def _get(d, key):
    for part in key.split("."):
        d = d[part]
    return d


def check_output_dir(path: str, key: str):
    """One line, before any work, if ``path`` cannot be a directory we write in: a file
    there or above it, or a directory (or the run's own subdirectory) not writable."""
    if not path.strip():  # (sweeps resolve configs with run_dir "" before naming jobs)
        raise PtjaxError(f"{key} is empty; name the directory")
    if storage.is_remote(path):
        storage.check_remote_dir(path, key)
        return
    target = probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    subs = [os.path.join(target, n) for n in ("checkpoints", "export", "tb")] \
        if probe == target else []
    for p in (probe, *subs):
        if os.path.exists(p) and not os.path.isdir(p):
            raise PtjaxError(f"{key}={path}: {p} is a file, not a directory")
        if os.path.isdir(p) and not os.access(p, os.W_OK | os.X_OK):
            raise PtjaxError(f"{key}={path}: {p} is not writable; give a writable directory")


def check_output_file(path: str, what: str):
    """One line, before any work, if ``path`` cannot be written as a file."""
    if os.path.isdir(path):
        raise PtjaxError(f"{what} {path}: is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise PtjaxError(f"{what} {path}: its directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PtjaxError(f"{what} {path}: not writable")


def _makedirs(path: str, key: str):
    try:
        storage.makedirs(path)
    except OSError as e:
        raise PtjaxError(f"{key}={path}: cannot be created ({e.strerror})") from None


class RunLock:
    """An exclusive lock on a run directory. Local: flock on the directory itself (nothing
    is written, and the kernel drops it when its process dies, even by SIGKILL). A URL:
    the object ``<run_dir>/.lock`` (``ObjectLock``)."""

    def __init__(self, run_dir: str):
        self._object = None
        if storage.is_remote(run_dir):
            self._object = ObjectLock(run_dir)
            return
        self._fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise PtjaxError(f"run_dir={run_dir}: another ptjax process is training this run "
                             "now; wait for it to finish, or use another run_dir") from None
        except OSError:  # a file system without locks: run unguarded rather than not at all
            pass

    def release(self):
        if self._object is not None:
            self._object.release()
        else:
            os.close(self._fd)


def _boot_id() -> str:
    """This machine's boot (Linux): a pid from before a reboot names no process now."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ObjectLock:
    """The lock of a run directory on object storage: the object ``<run_dir>/.lock``,
    created only if absent (GCS: ``ifGenerationMatch=0``, so of two processes exactly one
    creates it), holding the holder's host, boot, pid and start time, and deleted (that
    generation only) on release. Nothing drops it when its holder dies: a lock whose
    holder is known gone (same host and boot, pid not running; or same host, an earlier
    boot) is taken over (deleted if still that generation, then created again); any other
    is refused in one line naming the holder and the object to delete by hand."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        me = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
        data = json.dumps(me).encode()
        self.generation = storage.create_exclusive(self.path, data)
        if self.generation is None:  # held: take it over only from a holder known gone
            held, gen = self._holder()
            if held is None and gen is None:  # released meanwhile
                self.generation = storage.create_exclusive(self.path, data)
            elif held is not None and self._gone(held, me) and gen and \
                    storage.remove(self.path, gen):
                print(f"note: {self.path}: taking over the lock of {_who(held)}, which no "
                      "longer runs", flush=True)
                self.generation = storage.create_exclusive(self.path, data)
            if self.generation is None:
                held, _ = self._holder()
                raise PtjaxError(
                    f"run_dir={run_dir}: another ptjax process is training this run now "
                    f"({_who(held)}; lock {self.path}); wait for it to finish, or use "
                    "another run_dir. If that process is gone (a killed run on another "
                    f"machine leaves its lock), delete the lock: {_rm(self.path)}")

    def _holder(self):
        """(the lock's JSON or None, its generation)."""
        gen = storage.generation(self.path)
        try:
            return json.loads(storage.read_bytes(self.path)), gen
        except (FileNotFoundError, ValueError):
            return None, gen

    @staticmethod
    def _gone(held: dict, me: dict) -> bool:
        if held.get("host") != me["host"] or not isinstance(held.get("pid"), int):
            return False  # another machine's process: only its user knows
        return held.get("boot") != me["boot"] or not _alive(held["pid"])

    def release(self):
        storage.remove(self.path, self.generation)


def _rm(url: str) -> str:
    return f"gcloud storage rm {url}" if url.startswith("gs://") else f"delete {url}"


def _who(held) -> str:
    if not held:
        return "holder unknown"
    return f"host {held.get('host')}, pid {held.get('pid')}, since {held.get('since')}"


class NullLog:
    def write(self, rows):
        pass

    def close(self):
        pass


def locked_run(cfg, body):
    """``body(cfg, main, locks)``: a run's output directory checked, the processes of a
    multi-host job joined, and process 0 holding the run directory's lock (from the start
    where it exists, else from ``claim_run_dir``) until ``body`` returns or fails."""
    check_output_dir(cfg.run_dir, "run_dir")
    initialize_distributed(cfg.mesh.distributed)  # before anything asks which process it is
    main = is_main_process()
    locks = [RunLock(cfg.run_dir)] if main and storage.isdir(cfg.run_dir) else []
    try:
        with preemption.handling_sigterm():  # SIGTERM: save the step, exit 75 (the CLI)
            return body(cfg, main, locks)
    finally:
        for lock in locks:
            lock.release()


def claim_run_dir(run_dir: str, main: bool, locks: list):
    """Every check has passed: process 0 creates the run directory and takes its lock."""
    if main and not locks:
        _makedirs(run_dir, "run_dir")
        locks.append(RunLock(run_dir))
    sync("ptjax-run-dir")


def newest_checkpoint(ckpt_dir: str, keep: int, restore) -> tuple[int, object, list]:
    """(step, ``restore(reader, step)``, damaged) for the newest intact checkpoint in
    ``ckpt_dir``, read without writing anything; (0, None, []) when there is none."""
    if not storage.isdir(ckpt_dir):
        return 0, None, []
    reader = Checkpointer(ckpt_dir, keep, create=False)
    try:
        step, out, damaged = reader.newest_intact(lambda s: restore(reader, s), report=False)
        return step or 0, out, damaged
    finally:
        reader.close()


def open_checkpoints(ckpt_dir: str, keep: int, main: bool, damaged, start: int) -> Checkpointer:
    """The run's checkpoints opened for writing, once ``claim_run_dir`` has run; damaged
    ones (``newest_checkpoint``) are named and moved aside by process 0 first, so the run
    can write those steps again."""
    ckpt = Checkpointer(ckpt_dir, keep)
    if main:
        ckpt.report_damaged(damaged, start, quarantine=True)
    sync("ptjax-damaged-moved")
    ckpt.reload()
    return ckpt


def write_json(path: str, obj):
    """Atomic: a run killed while writing leaves the old file or the new one, never half."""
    storage.write_text(path, json.dumps(obj, indent=2))


def check_start(cfg, main: bool):
    """Before anything is loaded: a rerun's config must match the run it resumes, and a
    built-in tiny model not yet written needs a directory it can be written in."""
    if main and storage.isdir(cfg.run_dir):
        check_resumable(cfg.run_dir, cfg)
    if cfg.model.path in TINY and not os.path.exists(
            os.path.join(cfg.model.tiny_dir, cfg.model.path, "config.json")):
        check_output_dir(os.path.join(cfg.model.tiny_dir, cfg.model.path), "model.tiny_dir")


def data_shards(ckpt_dir: str, tc) -> int:
    """How many shards a run's train data is cut into: as the run started (its newest
    checkpoint says), so a resumed run keeps its data order on another number of
    processes (``TrainStream``); else ``train.data_shards`` or one per process."""
    _, meta, _ = newest_checkpoint(ckpt_dir, tc.keep_checkpoints,
                                   lambda reader, step: reader.restore_meta(step))
    return (meta or {}).get("data_shards", tc.data_shards or jax.process_count())
