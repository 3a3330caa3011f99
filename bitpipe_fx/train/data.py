"""A byte-level text corpus that needs no download, and a loader whose batch is a pure function of the step.

By default the corpus is the Python standard library's own source files (``*.py`` under ``sysconfig``'s
``stdlib`` path, tests and installed packages left out): text that exists wherever Python does. Any other text
file or directory can be given instead (in a directory, hidden entries and binary files, those with a NUL byte
in their first 8 KiB, are skipped; a binary file named itself is refused). Files are read in sorted order up
to ``max_bytes``; a file goes to validation when the CRC-32 of its relative path is 0 modulo ``VAL_EVERY``, so
the split is the same on every machine and every run (a single file is split at 90 %). NUL bytes are dropped
so that byte 0 can play ``[MASK]`` for masked-LM training; the vocabulary is the 256 byte values.

Batch ``k`` of a run is drawn from a generator seeded with ``(seed, k)``: a resumed run sees exactly the
batches an uninterrupted run would, with no loader state to checkpoint.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from bitpipe_fx.errors import ConfigError

Rows = torch.Tensor | tuple[torch.Tensor, ...]  # one tensor, or a tuple of tensors with the same rows
Batch = tuple[Rows, torch.Tensor]  # (inputs: tokens, or (masked tokens, attention mask) for mlm; targets)

VOCAB = 256
MASK = 0  # the [MASK] token of masked-LM batches; corpora never contain byte 0
VAL_EVERY = 20  # about one file in twenty goes to validation
DEFAULT_MAX_BYTES = 16 * 2**20
STDLIB = "stdlib"  # the name of the default corpus
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
TASKS = ("lm", "mlm")


@dataclass(frozen=True, eq=False)
class Corpus:
    """A corpus split into train and validation byte streams (uint8 tensors)."""

    name: str
    files: int
    train: torch.Tensor
    val: torch.Tensor

    def describe(self) -> str:
        """One line: where the text came from and how big each split is."""
        mb = 2**20
        return (f"{self.name}: {self.files} file(s), {(len(self.train) + len(self.val)) / mb:.1f} MiB "
                f"(train {len(self.train) / mb:.2f} MiB, validation {len(self.val) / mb:.2f} MiB)")


def stdlib_root() -> Path:
    """Directory of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, suffix: str | None = None, skip: frozenset[str] = frozenset()) -> list[Path]:
    """Regular files under ``root`` in sorted relative-path order; hidden entries and ``skip`` dirs left out."""
    out: list[Path] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            path = Path(directory, name)
            if path.is_file():
                out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _is_text(data: bytes) -> bool:
    return b"\0" not in data[:8192]


def load_corpus(path: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """The standard library's sources (``path`` None or "stdlib"), or a text file or directory."""
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes (max_bytes) must be >= 1, got {max_bytes}")
    if path is None or path == STDLIB:
        root = stdlib_root()
        files = list_files(root, ".py", SKIP_DIRS)
        name = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        root = Path(path)
        if not root.exists():
            raise ConfigError(
                f"corpus path {path!r} does not exist; pass an existing text file or directory with --data, "
                "or leave --data out to train on the Python standard library's source"
            )
        files = [root] if root.is_file() else list_files(root, None, frozenset({"__pycache__"}))
        name = str(root)
    train, val, used, total = [], [], 0, 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        if f == root and not _is_text(data):  # one rule for text: no NUL in the first 8 KiB
            raise ConfigError(f"--data {path!r} is not a text file (it has NUL bytes in its first 8 KiB); pass a "
                              "text file, or a directory (binary files in it are skipped)")
        if not data or not _is_text(data):
            continue
        data = data.replace(b"\0", b"") + b"\n"
        total += len(data)
        used += 1
        rel = f.name if f == root else f.relative_to(root).as_posix()
        (val if zlib.crc32(rel.encode()) % VAL_EVERY == 0 else train).append(data)
    if used == 0:
        raise ConfigError(f"corpus {name!r} holds no text files; pass a text file or a directory of text files")
    train_bytes, val_bytes = b"".join(train), b"".join(val)
    if len(val_bytes) < total // (4 * VAL_EVERY) or len(train_bytes) < total // 2:
        whole = b"".join(train + val)  # too few files for a file-level split: hold out the last 10 % instead
        cut = len(whole) - len(whole) // 10
        train_bytes, val_bytes = whole[:cut], whole[cut:]
    return Corpus(name, used, _tensor(train_bytes), _tensor(val_bytes))


def needed_vocab(corpus: Corpus) -> int:
    """Tokens a model needs to read this corpus: its largest byte value + 1 (MASK, 0, is below it)."""
    return max(int(t.max()) for t in (corpus.train, corpus.val) if len(t)) + 1


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class Batches:
    """(inputs, targets) batches of ``rows`` sequences of ``seq`` bytes for a causal (lm) or masked (mlm) LM.

    lm: inputs = tokens (rows, seq), targets = the next bytes. mlm: inputs = (tokens with ``mask_prob`` of the
    positions replaced by MASK, attention_mask of ones), targets = the original byte there, -100 elsewhere.
    """

    def __init__(self, corpus: Corpus, task: str, rows: int, seq: int, seed: int, mask_prob: float = 0.15) -> None:
        if task not in TASKS:
            raise ConfigError(f"task {task!r} is unknown; use one of {TASKS}")
        if rows < 1 or seq < 2:
            raise ConfigError(f"batches need rows >= 1 and seq >= 2, got rows={rows}, seq={seq}")
        for split, data in (("train", corpus.train), ("validation", corpus.val)):
            if len(data) < seq + 2:
                raise ConfigError(
                    f"the {split} split of {corpus.name!r} has {len(data)} bytes, fewer than one sequence of "
                    f"--seq-len {seq} needs ({seq + 2}); pass more text with --data or a smaller --seq-len"
                )
        self.corpus, self.task, self.rows, self.seq = corpus, task, rows, seq
        self.seed, self.mask_prob = seed, mask_prob

    def _generator(self, step: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 4 + salt)

    def _windows(self, data: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return data[offsets[:, None] + torch.arange(self.seq + 1)].long()

    def _make(self, windows: torch.Tensor, gen: torch.Generator) -> Batch:
        if self.task == "lm":
            return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        tokens = windows[:, :-1]
        masked = torch.rand(tokens.shape, generator=gen) < self.mask_prob
        masked[:, 0] |= ~masked.any(dim=1)  # at least one target per row
        inputs = torch.where(masked, torch.full_like(tokens, MASK), tokens)
        targets = torch.where(masked, tokens, torch.full_like(tokens, -100))
        return (inputs.contiguous(), torch.ones_like(tokens)), targets.contiguous()

    def train(self, step: int) -> Batch:
        """Batch of training step ``step`` (random windows of the train split; a pure function of seed and step)."""
        gen = self._generator(step, 0)
        offsets = torch.randint(0, len(self.corpus.train) - self.seq - 1, (self.rows,), generator=gen)
        return self._make(self._windows(self.corpus.train, offsets), gen)

    def validation(self, count: int) -> list[Batch]:
        """``count`` fixed batches spread evenly over the validation split (the same for every evaluation)."""
        last = len(self.corpus.val) - self.seq - 1
        offsets = torch.linspace(0, last, count * self.rows).long()
        gen = self._generator(0, 1)
        return [self._make(self._windows(self.corpus.val, chunk), gen) for chunk in offsets.split(self.rows)]


def to_device(batch: Rows, device: torch.device | str) -> Rows:
    """A batch (tensors, or tuples of them) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return type(batch)(to_device(b, device) for b in batch)
