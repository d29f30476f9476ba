"""Preemption: a SIGTERM (a spot or preemptible VM's notice, a SLURM job's time limit, a
``kill``) ends a run at the next step boundary with a checkpoint of that step, and the same
command resumes it from there, bit for bit as if it had never stopped.

One process: a SIGTERM handler, installed while a run (or a sweep) is under way, sets a
flag that the step loop reads after each step (and after that step's evaluation, so a
notice heard during an evaluation still loses nothing). A notice heard before the first
step stops the run there (its newest checkpoint is as it was); one heard after the last
step lets the run finish (export, results.json) and exit 0; a sweep stops before its next
job.

A multi-process job (``jax.distributed`` initialized): every process must stop and save at
the same step, and the notice may reach one process only. JAX's preemption service, which
``jax.distributed.initialize`` starts and which hears SIGTERM on any process, settles the
step: ``multihost_utils.reached_preemption_sync_point(step)`` is True on every process at
the same step (the sync point orbax's ``CheckpointManager.reached_preemption`` and T5X use).
No Python handler is installed then: it would take SIGTERM from the service.

The command then exits with ``EXIT_PREEMPTED`` (75, sysexits' EX_TEMPFAIL: "try again").
"""
from __future__ import annotations

import contextlib
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 75

_heard = threading.Event()
_depth = [0]  # nested ``handling_sigterm`` (a sweep's runs): the outermost one installs


class Preempted(Exception):
    """A run (or sweep) stopped by a preemption notice. ``what``: where it stopped and
    which checkpoint holds its state; ``step``: that checkpoint's step (None: none)."""

    def __init__(self, what: str, step: int | None = None):
        self.step = step
        super().__init__(f"preempted (SIGTERM) {what}; rerun the same command to resume")


@contextlib.contextmanager
def handling_sigterm():
    """While inside: SIGTERM is a preemption notice (``heard``, ``reached``) instead of the
    end of the process. Not installed in a multi-process job (JAX's preemption service
    hears it there) or off the main thread (where Python cannot set handlers: a notebook's
    worker thread keeps SIGTERM's default meaning)."""
    install = (_depth[0] == 0 and not jax.distributed.is_initialized()
               and threading.current_thread() is threading.main_thread())
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _heard.set()) \
        if install else None
    if install:
        _heard.clear()
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if install:
            signal.signal(signal.SIGTERM, previous)
            _heard.clear()


def heard() -> bool:
    """A notice has come (one process; False in a multi-process job: see ``reached``)."""
    return _heard.is_set() and not jax.distributed.is_initialized()


def reached(step: int) -> bool:
    """Whether to save at ``step`` and stop. Multi-process: call it at every step on every
    process (the sync point is collective)."""
    if not jax.distributed.is_initialized():
        return _heard.is_set()
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the service is off (jax_enable_preemption_service=False)
        return False
