"""The seam every training method plugs into.

A method owns: its trainable pytree (every leaf with a leading K axis: K prompts,
prefixes or prompt encoders trained side by side, or K = 1 for model tuning), how one of
the K enters the frozen model (``inputs``: params for the forward and ``PromptInputs``),
its shapes and shardings (``ptjax plan``, checkpoint restore), its optimizer, its export
and its checks. The train step, evaluation, checkpoints, resume, ensembles, sweeps and
analysis only call these, so they work the same for every method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.data.templates import parse
from ptjax.errors import PtjaxError
from ptjax.optim import make_optimizer, per_prompt
from ptjax.sharding import check_batch_size, logical_rules, place


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method bound to a model architecture and its config section.

    model_config: the frozen model's architecture (T5Config / GPT2Config).
    settings: the method's own config section (``method.<name>``), or None.
    prompt: the run's ``prompt`` section (length P, seeds = the K members, inits).
    dtype: the model's compute dtype.
    templates: each member's template: where a soft prompt goes when not prepended.
    Hashable, so jitted functions take it as a static argument.
    """
    model_config: Any
    prompt: Any
    settings: Any = None
    dtype: Any = jnp.float32
    templates: tuple = ()  # each member's template (task.template(s)); () for none

    name: ClassVar[str] = ""
    # Whether K members share a job (packed sweeps, ensembles); model tuning trains one.
    packs: ClassVar[bool] = True
    # Whether the frozen weights themselves are trained (they are the trainable state).
    tunes_weights: ClassVar[bool] = False
    # Whether there is anything to train (prompt design evaluates the bare model).
    trains: ClassVar[bool] = True
    # Whether its members start from ``prompt.init`` (sweeps name the inits of a job).
    prompt_init: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    # ------------------------------------------------------------------ what it trains

    @property
    def K(self) -> int:
        return len(self.prompt.seeds) if self.packs else 1

    @property
    def seeds(self) -> tuple:
        return tuple(self.prompt.seeds[:self.K])

    def init(self, model, cfg, task):
        """The initial trainable tree on the host, fp32, every leaf [K, ...]."""
        raise NotImplementedError

    def shapes(self) -> Any:
        """The trainable tree as ``jax.ShapeDtypeStruct`` leaves (no weights needed)."""
        raise NotImplementedError

    def shardings(self, shapes, mesh, rules):
        """Shardings of the trainable tree on ``mesh``: small trees are replicated."""
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda _: rep, shapes)

    def inputs(self, member, frozen):
        """One member's (params for the forward, ``PromptInputs`` or None), in the jitted
        step. member: the trainable tree without its K axis; frozen: the frozen params."""
        raise NotImplementedError

    def optimizer(self, optim_cfg, total_steps: int):
        """The Optax transformation of the whole [K, ...] tree: K independent optimizers."""
        return per_prompt(make_optimizer(optim_cfg, total_steps))

    # ------------------------------------------------------------------ around a run

    @property
    def prompt_tokens(self) -> int:
        """P, the virtual tokens (prompt or prefix length) of each member; 0 for none."""
        return self.prompt.length

    def positions(self) -> int:
        """Token positions the method occupies before the input (GPT-2's position table)."""
        return 0

    def check(self, model):
        """One-line errors for settings this model cannot take (called before training)."""

    def describe(self, k: int) -> dict:
        """What results.json says of member k beyond its seed (e.g. its init)."""
        return {}

    def export(self, directory: str, best, model, base_model: str) -> None:
        """Write the best members (host tree, leaves [K, ...]) under ``directory``."""
        raise NotImplementedError

    @property
    def peft_prepends(self) -> bool:
        """Whether the prompt is prepended, as PEFT's adapters put it."""
        return all(t.soft_tokens == 0 or t.prepends for t in map(parse, self.templates))

    def member(self, tree, k: int):
        """Member k of a [K, ...] tree."""
        return jax.tree.map(lambda x: x[k], tree)


def uniform_init(rng: np.random.Generator, shape, fan_in: int):
    """torch.nn.Linear's default weight/bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def stack_members(members: list) -> Any:
    """[tree, ...] (one per member) -> one tree with leaves [K, ...] in fp32."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x, np.float32) for x in xs]),
                        *members)


def shape_tree(tree) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), tree)


def need(condition: bool, message: str):
    if not condition:
        raise PtjaxError(message)


def check_lengths(model, method, cfg):
    """One-line errors for a prompt or sequence the model cannot position."""
    P = method.positions()
    limit = model.config.max_prompt_positions
    if limit is None:  # T5: relative positions, any length
        return
    if P > limit:
        raise PtjaxError(f"prompt.length={P} is longer than the model's {limit} positions")
    total = P + cfg.task.max_input_length + cfg.task.max_target_length
    if total > limit:
        raise PtjaxError(f"prompt.length ({P}) + task.max_input_length "
                         f"({cfg.task.max_input_length}) + task.max_target_length "
                         f"({cfg.task.max_target_length}) = {total} exceeds the model's "
                         f"{limit} positions")


def check_run(model, method, cfg, mesh):
    """Every one-line error a run's method, lengths and batch can give before any step
    (``ptjax train`` and ``ptjax plan`` alike)."""
    method.check(model)
    check_lengths(model, method, cfg)
    check_batch_size(cfg.train.batch_size, mesh, microbatches=cfg.train.microbatches)


def place_trainable(method, tree, mesh, cfg):
    """A method's host trainable tree placed with its shardings on ``mesh``."""
    shardings = method.shardings(method.shapes(), mesh, logical_rules(cfg.mesh.fsdp))

    def put(x, sh):
        if isinstance(x, jax.Array):  # already on the devices (model weights): reshard there
            return jax.jit(lambda a: a.astype(jnp.float32), out_shardings=sh)(x)
        return place(np.asarray(x, np.float32), sh)
    return jax.tree.map(put, tree, shardings)
