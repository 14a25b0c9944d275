"""Extract short English sentences from the standard library's ``pydoc_data`` (issue 14 corpus).

``pydoc_data.topics`` holds the text of the language reference's documentation topics (PSF
licence) and ships with every Python installation, so nothing is downloaded. Its text differs
between Python versions, so the sentences are extracted once by this script and the result is
committed (``hmoe_sim/hora/data/pydoc_sentences.tsv``) with a fixed train/test split; the
experiments read the committed file, never ``pydoc_data`` itself.

Rules (all deterministic): paragraphs are split on blank lines; headings and paragraphs with
grammar (``::=``) or interpreter prompts (``>>>``) are dropped; the lines of the others are
joined and cut into sentences after ``.``, ``!`` or ``?`` followed by a space and a capital
letter or a quote (code lines fail the sentence rules below). A sentence is kept when it is ASCII,
starts with a capital letter, ends with a full stop, has ``MIN_WORDS`` to ``MAX_WORDS`` words,
at most ``MAX_CHARS`` characters, and at least 70% of its characters are letters or spaces.
Duplicates are dropped, the rest sorted, shuffled with ``random.Random(SPLIT_SEED)`` and the
first ``TEST_FRACTION`` of them form the test split.

``--source modules`` (issue 21, the larger training corpus of ``finetune_pretrained.py --large``)
applies the same paragraph and sentence rules to the docstrings of the standard library's modules,
classes and functions, read with ``ast`` from the source files (nothing is imported; test
packages, ``idlelib``, ``lib2to3`` and ``site-packages`` are skipped). Sentences already in the
pydoc file are dropped; ``MAX_MODULE_SENTENCES`` of the rest are drawn with
``random.Random(SPLIT_SEED)`` (to keep the committed file small), sorted and all written as ``train`` rows of
``hmoe_sim/hora/data/module_sentences.tsv`` (the test split stays pydoc's).

Usage::

    python experiments/extract_pydoc_sentences.py                    # rewrites the committed file
    python experiments/extract_pydoc_sentences.py --check            # compares instead of writing
    python experiments/extract_pydoc_sentences.py --source modules   # the module-docstring corpus
"""

from __future__ import annotations

import argparse
import ast
import platform
import pydoc_data.topics
import random
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "hmoe_sim/hora/data/pydoc_sentences.tsv"
MODULES_OUT = ROOT / "hmoe_sim/hora/data/module_sentences.tsv"
MAX_MODULE_SENTENCES = 4000
_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
MIN_WORDS, MAX_WORDS, MAX_CHARS = 5, 20, 140
TEST_FRACTION = 0.25
SPLIT_SEED = 14
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


def paragraphs(text: str) -> list[str]:
    """Paragraphs of one topic (lines joined), without headings, grammar or interpreter prompts."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        if any(_HEADING_RULE.match(line.strip()) for line in lines) or "::=" in block or ">>>" in block:
            continue
        kept.append(" ".join(line.strip() for line in lines))
    return kept


def keep(sentence: str) -> bool:
    """Whether a candidate sentence passes the length and character rules of the module docstring."""
    words = sentence.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS) or len(sentence) > MAX_CHARS:
        return False
    if not sentence.isascii() or not sentence[0].isupper() or not sentence.endswith(".") or sentence.endswith(".."):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in sentence)
    return letters >= 0.7 * len(sentence)


def extract() -> list[str]:
    """Unique kept sentences of all topics, in sorted order."""
    found = set()
    for name in sorted(pydoc_data.topics.topics):
        for paragraph in paragraphs(pydoc_data.topics.topics[name]):
            found.update(s.strip() for s in _SENTENCE_END.split(paragraph) if keep(s.strip()))
    return sorted(found)


def docstrings(path: Path) -> list[str]:
    """Docstrings of a file's module, classes and functions (in ``ast.walk`` order); none if it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    return [doc for n in nodes if (doc := ast.get_docstring(n))]


def extract_modules(exclude: set[str]) -> list[str]:
    """Unique kept sentences of the standard library's docstrings, not in ``exclude``, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = set()
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIPPED_DIRS & set(path.relative_to(stdlib).parts[:-1]):
            continue
        for doc in docstrings(path):
            for paragraph in paragraphs(doc):
                found.update(s.strip() for s in _SENTENCE_END.split(paragraph) if keep(s.strip()))
    kept = sorted(found - exclude)
    if len(kept) > MAX_MODULE_SENTENCES:
        kept = sorted(random.Random(SPLIT_SEED).sample(kept, MAX_MODULE_SENTENCES))
    return kept


def render_modules(sentences: list[str]) -> str:
    """The module corpus' TSV text: every sentence a ``train`` row."""
    rows = [f"# {len(sentences)} sentences (drawn from the kept ones) from the docstrings of the standard library "
            f"of Python "
            f"{platform.python_version()} (PSF licence); written by experiments/extract_pydoc_sentences.py "
            f"--source modules", "split\tsentence"]
    rows += [f"train\t{s}" for s in sentences]
    return "\n".join(rows) + "\n"


def render(sentences: list[str]) -> str:
    """The TSV text: a comment naming the source, a header, then ``split<TAB>sentence`` rows."""
    order = list(sentences)
    random.Random(SPLIT_SEED).shuffle(order)
    n_test = round(TEST_FRACTION * len(order))
    rows = [f"# {len(order)} sentences from pydoc_data.topics of Python {platform.python_version()} (PSF licence); "
            f"written by experiments/extract_pydoc_sentences.py", "split\tsentence"]
    rows += [f"{'test' if i < n_test else 'train'}\t{s}" for i, s in enumerate(order)]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    parser.add_argument("--source", choices=["pydoc", "modules"], default="pydoc")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.source == "modules":
        args.out = args.out or MODULES_OUT
        text = render_modules(extract_modules(set(extract())))
    else:
        args.out = args.out or OUT
        text = render(extract())
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print("identical" if same else f"differs from {args.out} (expected when the Python version differs)")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    counts = {split: text.count(f"\n{split}\t") for split in ("train", "test")}
    print(f"wrote {args.out}: {counts['train']} train, {counts['test']} test sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
