"""The no-download corpus and the step-indexed loader (bitpipe_fx.train.data)."""

from __future__ import annotations

import pytest
import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.train.data import MASK, Batches, Corpus, load_corpus, to_device


def _tree(root, names):
    """Files with distinct, recognisable content; returns {relative path: bytes}."""
    out = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"# file {name}\n".encode() + bytes([97 + i % 26]) * (50 + i)
        path.write_bytes(data)
        out[name] = data
    return out


def test_directory_split_keeps_files_whole_and_is_deterministic(tmp_path):
    names = [f"pkg{i % 3}/mod{i}.txt" for i in range(60)]
    files = _tree(tmp_path, reversed(names))  # creation order must not matter
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    a, b = load_corpus(str(tmp_path)), load_corpus(str(tmp_path))
    assert a.files == 60
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    train, val = bytes(a.train.tolist()), bytes(a.val.tolist())
    assert 0 < len(val) < len(train)
    for data in files.values():
        assert (data + b"\n" in train) != (data + b"\n" in val)  # each file lies wholly in one split
    assert len(train) + len(val) == sum(len(d) + 1 for d in files.values())
    assert b"never read" not in train + val and b"binary" not in train + val


def test_single_file_holds_out_its_last_tenth_and_drops_nul(tmp_path):
    path = tmp_path / "book.txt"
    text = bytes(range(1, 128)) * 70 + b"\x00\x00"  # NULs past the first 8 KiB: a text file, NULs dropped
    path.write_bytes(text)
    corpus = load_corpus(str(path))
    whole = bytes(corpus.train.tolist()) + bytes(corpus.val.tolist())
    assert whole == text.replace(b"\x00", b"") + b"\n"
    assert len(corpus.val) == len(whole) // 10
    assert 0 not in set(corpus.train.tolist())


def test_a_binary_file_named_with_data_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"^--data '.*weights\.bin' is not a text file \(it has NUL bytes in its "
                                          r"first 8 KiB\); pass a text file, or a directory"):
        load_corpus(str(path))


def test_stdlib_corpus_is_python_source_capped_at_max_bytes():
    corpus = load_corpus(None, max_bytes=300_000)
    assert corpus.files > 1 and len(corpus.train) + len(corpus.val) <= 300_000 + corpus.files
    text = bytes(corpus.train.tolist())
    assert b"def " in text and b"import " in text
    assert len(corpus.val) > 0 and "standard library" in corpus.describe()


def test_missing_path_and_empty_directory_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"corpus path '.*nope' does not exist.*--data"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no text files"):
        load_corpus(str(tmp_path / "empty"))


def _corpus(n: int = 5000) -> Corpus:
    gen = torch.Generator().manual_seed(3)
    data = torch.randint(1, 256, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)
    return Corpus("random", 1, data[: n - n // 10], data[n - n // 10 :])


def _is_window(row: torch.Tensor, data: torch.Tensor) -> bool:
    return bytes(row.to(torch.uint8).tolist()) in bytes(data.tolist())


def test_lm_batches_are_next_byte_windows_and_a_pure_function_of_seed_and_step():
    corpus = _corpus()
    batches = Batches(corpus, "lm", rows=6, seq=12, seed=1)
    x, y = batches.train(7)
    assert x.shape == y.shape == (6, 12) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    full = torch.cat([x, y[:, -1:]], dim=1)
    assert all(_is_window(row, corpus.train) for row in full)
    x2, y2 = Batches(corpus, "lm", rows=6, seq=12, seed=1).train(7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, batches.train(8)[0])
    assert not torch.equal(x, Batches(corpus, "lm", rows=6, seq=12, seed=2).train(7)[0])


def test_mlm_batches_mask_some_positions_and_target_only_those():
    corpus = _corpus()
    (tokens, attention), targets = Batches(corpus, "mlm", rows=8, seq=32, seed=0).train(1)
    masked = targets != -100
    assert masked.any(dim=1).all()  # every row has a target
    assert (tokens[masked] == MASK).all() and (tokens[~masked] != MASK).all()
    assert torch.equal(attention, torch.ones_like(tokens))
    original = torch.where(masked, targets, tokens)
    assert all(_is_window(row, corpus.train) for row in original)
    assert 0.05 < masked.float().mean().item() < 0.35


def test_validation_batches_are_fixed_and_come_from_the_validation_split():
    corpus = _corpus()
    batches = Batches(corpus, "lm", rows=4, seq=10, seed=0)
    a, b = batches.validation(3), batches.validation(3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert all(_is_window(torch.cat([r, t[-1:]]), corpus.val) for r, t in zip(xa, ya))


def test_batches_refuse_a_split_shorter_than_one_sequence_and_unknown_tasks():
    corpus = Corpus("tiny", 1, torch.ones(100, dtype=torch.uint8), torch.ones(9, dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"validation split of 'tiny' has 9 bytes.*--seq-len 16"):
        Batches(corpus, "lm", rows=2, seq=16, seed=0)
    with pytest.raises(ConfigError, match="task 'clm' is unknown"):
        Batches(_corpus(), "clm", rows=2, seq=4, seed=0)


def test_to_device_keeps_the_batch_structure():
    batch = (torch.zeros(2), torch.ones(3))
    moved = to_device(batch, "cpu")
    assert isinstance(moved, tuple) and torch.equal(moved[1], batch[1])
