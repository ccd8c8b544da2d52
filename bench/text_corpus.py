"""Real English text for the language-model benchmark, read from a Debian package, byte-level.

The corpus is the Jargon File 4.4.7 (Eric S. Raymond et al., public domain): about 1.5 MB of
modern English prose (a lexicon of hacker slang with essays and appendices), shipped plain text
by Debian's `jargon-text` package as /usr/share/doc/jargon-text/jargon.txt.gz. Nothing is
downloaded at run time: `apt-get install jargon-text` once (any Debian or Ubuntu), or pass another
plain-text or .gz file.

Cleaning keeps prose: the text is cut into paragraphs at blank lines, each paragraph's wrapped
lines are joined, and paragraphs of fewer than four words are dropped (the long lists of
headwords in the tables of contents) unless they are an entry's heading (`:gobble: vt.`).
Typographic quotes and dashes become ASCII, so almost every byte is printable ASCII.

Splitting: the cleaned text is cut into consecutive blocks of `block` bytes and every tenth block
is held out, so the held-out text is spread over the whole file (lexicon, essays, appendices)
rather than being its last chapter.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
VOCAB_SIZE = 256  # bytes

_ASCII = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2014": "--",
        "\u2013": "-",
        "\u2026": "...",
        "\u00b7": "-",  # the pronunciation guide's syllable dots
        "\u00a0": " ",
    }
)


@dataclass(frozen=True)
class Corpus:
    """Byte tokens (int64) of the training and held-out text, and where they came from."""

    source: str
    train: Tensor
    heldout: Tensor
    sha256: str  # of the cleaned text: part of the trained model's cache key

    @property
    def description(self) -> str:
        return (
            f"{self.source}: {len(self.train) + len(self.heldout):,} bytes after cleaning, "
            f"{len(self.train):,} train / {len(self.heldout):,} held out"
        )


def read_text(path: Path) -> str:
    if not path.exists():
        raise SystemExit(
            f"{path} not found: install Debian's jargon-text package "
            "(apt-get install jargon-text) or pass --corpus with a plain-text or .gz file"
        )
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def clean(text: str) -> str:
    """Paragraphs of prose, one per line (see the module docstring)."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", text.translate(_ASCII)):
        joined = " ".join(paragraph.split())
        if not joined or set(joined) <= set("=-_\u2550 "):
            continue
        if len(joined.split()) < 4 and not joined.startswith(":"):
            continue
        kept.append(joined)
    return "\n".join(kept) + "\n"


def load_corpus(path: Path = JARGON_FILE, block: int = 4096, every: int = 10) -> Corpus:
    """The cleaned text as bytes; every `every`-th block of `block` bytes is held out."""
    text = clean(read_text(path))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    blocks = data.split(block)
    heldout = torch.cat([b for i, b in enumerate(blocks) if i % every == every - 1])
    train = torch.cat([b for i, b in enumerate(blocks) if i % every != every - 1])
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Corpus(str(path), train, heldout, digest)


def random_windows(tokens: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """`count` windows of `length` tokens at random offsets, shape (count, length)."""
    starts = torch.randint(0, len(tokens) - length, (count,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def even_windows(tokens: Tensor, count: int, length: int) -> Tensor:
    """`count` non-overlapping windows of `length` tokens spread evenly over `tokens`."""
    available = len(tokens) // length
    picks = torch.linspace(0, available - 1, min(count, available)).round().long().unique()
    return torch.stack([tokens[i * length : (i + 1) * length] for i in picks.tolist()])


def decode(tokens: Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
