"""Templates: a task's input laid out as hard text, the example's fields, soft slots and
the answer's place (``task.template``), after OpenPrompt's mixed templates.

    "{premise} {soft:3} {hypothesis}? {soft:3} {mask}"

  {FIELD}          a field of the example: the raw TFDS / JSONL fields by name, or
                   {inputs} for the T5 text-to-text format
  {soft:N}         N soft tokens (trained by prompt tuning and P-tuning), initialised by
                   ``prompt.init``
  {soft:N=words}   N soft tokens initialised from the words' token embeddings (ids tiled
                   to N, PEFT's TEXT rule)
  {soft:N#name}    slots with the same name share their N vectors (also {soft:N=w#name})
  {mask}           where the answer goes: T5 puts <extra_id_0> there and the target becomes
                   <extra_id_0> + label; GPT-2's answer follows, so {mask} must come last.
                   Without {mask} the answer follows the input (T5: the plain target)
  {{ and }}        literal braces

The soft vectors of a template are one [P, D] table, P = the soft tokens of its distinct
slots in order of first use, so ``"{soft:P} {inputs}"`` is exactly today's prepended
prompt. Pieces are tokenized one by one (as OpenPrompt does), hard text stripped at its
ends, with a space before a piece that follows text; truncation shortens the longest
field first, never the template's own text or slots.
"""
from __future__ import annotations

import dataclasses
import re

from ptjax.errors import PtjaxError

_SLOT = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SOFT = re.compile(r"^soft:(\d+)(?:=([^#]*))?(?:#(\w+))?$")
_FIELD = re.compile(r"^\w+$")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a template. kind: "text" (``text``), "field" (``name``), "soft"
    (vectors ``start``..``start + n``, initialised from ``words`` if given), "mask".
    ``space``: whitespace stood before it in the template."""
    kind: str
    text: str = ""
    name: str = ""
    start: int = 0
    n: int = 0
    words: str = ""
    space: bool = False


@dataclasses.dataclass(frozen=True)
class Template:
    source: str
    pieces: tuple
    soft_tokens: int  # P: the distinct soft vectors
    has_mask: bool

    @property
    def fields(self) -> tuple:
        return tuple(p.name for p in self.pieces if p.kind == "field")

    @property
    def prepends(self) -> bool:
        """True when the soft tokens all come first, in order, and the rest is {inputs}
        alone: the prepended prompt PEFT's prompt-learning adapters hold."""
        kinds = [p.kind for p in self.pieces]
        starts = [p.start for p in self.pieces if p.kind == "soft"]
        n = len(starts)
        return (kinds[:n] == ["soft"] * n and kinds[n:] == ["field"] and
                self.pieces[-1].name == "inputs" and starts == sorted(set(starts)))

    @property
    def soft_inits(self) -> tuple:
        """(start, n, words) of every distinct slot initialised from words."""
        seen, out = set(), []
        for p in self.pieces:
            if p.kind == "soft" and p.words and p.start not in seen:
                seen.add(p.start)
                out.append((p.start, p.n, p.words))
        return tuple(out)


def parse(source: str, where: str = "task.template") -> Template:
    """A template string -> ``Template``, or a one-line error naming the problem."""
    def bad(problem: str) -> PtjaxError:
        return PtjaxError(f"{where}={source!r}: {problem}")

    pieces, named, P, masks = [], {}, 0, 0
    text, pos = "", 0  # hard text gathered since the last slot

    def flush():
        """The gathered hard text as a piece; whether whitespace ends it."""
        if text.strip():
            pieces.append(Piece("text", text=text.strip(), space=text[:1].isspace()))
        return bool(text) and text[-1:].isspace()

    for m in _SLOT.finditer(source):
        text += source[pos:m.start()]
        pos = m.end()
        if m.group(0) in ("{{", "}}"):
            text += m.group(0)[0]
            continue
        if m.group(1) is None:
            raise bad(f"unmatched {m.group(0)!r} at character {m.start()} (write "
                      f"{m.group(0) * 2} for a literal brace)")
        space = flush()
        text = ""
        spec = m.group(1).strip()
        if spec == "mask":
            masks += 1
            if masks > 1:
                raise bad("has two {mask} slots; a template has one answer")
            pieces.append(Piece("mask", space=space))
        elif spec.startswith("soft"):
            s = _SOFT.match(spec)
            if not s or int(s.group(1)) < 1:
                raise bad(f"{{{spec}}} is not a soft slot; write {{soft:N}}, "
                          "{soft:N=words} or {soft:N#name} with N >= 1")
            n, words, name = int(s.group(1)), (s.group(2) or "").strip(), s.group(3)
            if name and name in named:
                start, size = named[name]
                if size != n:
                    raise bad(f"soft slot #{name} has {size} tokens in one place and {n} in "
                              "another")
            else:
                start, P = P, P + n
                if name:
                    named[name] = (start, n)
            pieces.append(Piece("soft", start=start, n=n, words=words, space=space))
        elif _FIELD.match(spec):
            pieces.append(Piece("field", name=spec, space=space))
        else:
            raise bad(f"{{{spec}}} is neither a field name, {{soft:N}} nor {{mask}}")
    text += source[pos:]
    flush()
    if not any(p.kind == "field" for p in pieces):
        raise bad("has no field of the example (e.g. {inputs}, {premise})")
    return Template(source, tuple(pieces), P, masks == 1)


def check_for_model(template: Template, kind: str, where: str = "task.template"):
    """Model-dependent rules (kind: ``Model.kind``): GPT-2's answer follows the input, so
    {mask} comes last; a masked LM predicts its answer at {mask}, so it needs one."""
    if kind == "masked":
        n = sum(p.kind == "mask" for p in template.pieces)
        if n != 1:
            raise PtjaxError(f"{where}={template.source!r}: a masked LM predicts the answer "
                             f"at the template's {{mask}}; it needs exactly one, not {n}")
        return
    if kind == "causal" and template.has_mask and template.pieces[-1].kind != "mask":
        raise PtjaxError(f"{where}={template.source!r}: on a decoder-only model the answer "
                         "follows the input, so {mask} must be the last piece")


def field_values(example: dict) -> dict:
    """The fields a template may name: the raw fields (``example["fields"]``) and the
    formatted ``inputs``."""
    return {**example.get("fields", {}), "inputs": example["inputs"]}
