"""Byte-level text corpora that ship with every Python installation, for language models.

Two corpora, read from the running interpreter (no download, no network):

- ``python_docs``: the English documentation of :mod:`pydoc_data.topics` (the ``topics`` dict of
  ``help()``; about 465 KB in 79 topics on Python 3.11). A document is one topic, named by its key.
- ``python_sources``: the standard library's own ``.py`` files under
  ``sysconfig.get_paths()["stdlib"]`` (about 31 MB in 1,800 files on 3.11, 12 MB without tests).
  A document is one file, named by its path relative to that directory with ``/`` separators.
  Excluded: ``site-packages`` and ``dist-packages`` (third-party code, differs per machine), and
  the files that describe one build rather than the library (``_sysconfigdata_*.py`` and the
  ``config-*`` directory). The test suites (``test``, ``tests``, ``idle_test`` directories) are
  included by default, which makes this the larger corpus the LM experiments want; pass
  ``include_tests=False`` for library code only. Files are read as bytes, never decoded, so the
  test suite's deliberately mis-encoded files are just bytes too.

Tokens are bytes (vocabulary 256). Each document, as UTF-8 bytes, is followed by one end-of-
document byte :data:`END_OF_DOCUMENT` (0, which does not occur in the documentation and almost
never in source files); the documents of a split are concatenated in sorted-name order into one
stream per split.

Split (never changes): a document is in the test split iff the first 8 bytes of
``sha256(f"{corpus}/{name}")``, read as a big-endian integer and divided by 2**64, are below
:data:`TEST_FRACTION` (0.1). The rule depends on nothing but the corpus and the document's name,
so a topic or file keeps its split across Python versions and machines, and a file that appears
in a new version lands in one split without moving any other. (On 3.11 this puts 7 of the 79
documentation topics, 103 KB, in the test split.)

Sequences: a split's stream of n bytes gives ``(n - 1) // L`` sequences of length L: sequence i
reads bytes ``[i L, (i + 1) L)`` and predicts bytes ``[i L + 1, (i + 1) L + 1)``, so every byte
after the first is a target exactly once and the tail shorter than L is dropped. Training batches
visit the sequences in a fresh order each epoch: the permutation of ``numpy.random.default_rng
((seed, epoch))``; test batches go in stream order.

Baseline: :func:`unigram_bits_per_byte` is the cross-entropy, in bits per byte, of the train
split's byte frequencies (add-one smoothed over the 256 bytes, so no test byte has probability 0)
on the test split: H = -(1/|test|) sum_{b in test} log2 p(b), p(b) = (count_train(b) + 1) /
(|train| + 256). A language model has learnt something beyond byte frequencies when its test
bits per byte, CE_nats / ln 2, are below it; perplexity per byte is 2 ** bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from sparsejax.data.errors import DatasetNotFoundError
from sparsejax.errors import ConfigError

VOCAB_SIZE = 256
END_OF_DOCUMENT = 0
"""The byte appended to every document."""
TEST_FRACTION = 0.1
"""The share of the hash range that goes to the test split; changing it changes every split."""
TOKEN_DTYPE = np.dtype(np.int32)

PYTHON_DOCS = "python_docs"
PYTHON_SOURCES = "python_sources"
TEXT_DATASETS: tuple[str, ...] = (PYTHON_DOCS, PYTHON_SOURCES)
SPLITS: tuple[str, ...] = ("train", "test")

THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_HASH_RANGE = 2.0**64

Batch = tuple[np.ndarray, np.ndarray]
"""``(inputs, targets)``: int32 token arrays of shape ``(batch, L)``."""


def in_test_split(corpus: str, name: str) -> bool:
    """Whether the document ``name`` of ``corpus`` belongs to the test split (module docstring)."""
    digest = hashlib.sha256(f"{corpus}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_RANGE < TEST_FRACTION


def concatenate(documents: Mapping[str, bytes]) -> np.ndarray:
    """The uint8 stream of the documents in sorted-name order, each followed by
    :data:`END_OF_DOCUMENT`."""
    parts = []
    for name in sorted(documents):
        parts += [documents[name], bytes([END_OF_DOCUMENT])]
    return np.frombuffer(b"".join(parts), np.uint8)


def unigram_bits_per_byte(train: np.ndarray, test: np.ndarray) -> float:
    """Cross-entropy in bits per byte of the add-one-smoothed byte frequencies of ``train`` on
    ``test`` (both uint8 streams):
    -(1/|test|) sum_{b in test} log2((count_train(b) + 1) / (|train| + 256))."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64)
    log2_probs = np.log2(counts + 1.0) - np.log2(train.size + VOCAB_SIZE)
    test_counts = np.bincount(test, minlength=VOCAB_SIZE).astype(np.float64)
    return float(-(test_counts @ log2_probs) / test.size)


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """The train and test byte streams of a corpus and the documents in each.

    Attributes:
      name: the corpus, one of :data:`TEXT_DATASETS` (or a caller's name for its own documents).
      train_stream / test_stream: uint8 arrays, the concatenated documents of each split.
      train_documents / test_documents: the sorted document names of each split.
      source: where the documents were read from, for logs.
    """

    name: str
    train_stream: np.ndarray
    test_stream: np.ndarray
    train_documents: tuple[str, ...]
    test_documents: tuple[str, ...]
    source: str
    vocab_size: int = VOCAB_SIZE

    def stream(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        return self.train_stream if split == "train" else self.test_stream

    def num_sequences(self, split: str, seq_len: int) -> int:
        """How many sequences of ``seq_len`` tokens the split's stream gives."""
        _check_positive("seq_len", seq_len)
        return max(self.stream(split).size - 1, 0) // seq_len

    def sequences(self, split: str, seq_len: int, indices: np.ndarray | None = None) -> Batch:
        """``(inputs, targets)`` of the sequences ``indices`` (all of them by default)."""
        count = self.num_sequences(split, seq_len)
        index = np.arange(count) if indices is None else np.asarray(indices, np.int64)
        if index.size and (index.min() < 0 or index.max() >= count):
            raise IndexError(
                f"sequence indices must lie in [0, {count}) for {split} at L={seq_len}"
            )
        starts = index[:, None] * seq_len + np.arange(seq_len)[None, :]
        stream = self.stream(split)
        return stream[starts].astype(TOKEN_DTYPE), stream[starts + 1].astype(TOKEN_DTYPE)

    def epoch_order(self, seq_len: int, *, seed: int, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the training sequences."""
        rng = np.random.default_rng((seed, epoch))
        return rng.permutation(self.num_sequences("train", seq_len))

    def train_batches(
        self, seq_len: int, batch_size: int, *, seed: int, epoch: int
    ) -> Iterator[Batch]:
        """The full batches of one training epoch, in :meth:`epoch_order` (the remainder that
        does not fill a batch is left for this epoch)."""
        _check_positive("batch_size", batch_size)
        order = self.epoch_order(seq_len, seed=seed, epoch=epoch)
        for start in range(0, order.size - batch_size + 1, batch_size):
            yield self.sequences("train", seq_len, order[start : start + batch_size])

    def test_batches(self, seq_len: int, batch_size: int) -> Iterator[Batch]:
        """Every test sequence in stream order; the last batch may be smaller."""
        _check_positive("batch_size", batch_size)
        count = self.num_sequences("test", seq_len)
        for start in range(0, count, batch_size):
            yield self.sequences("test", seq_len, np.arange(start, min(start + batch_size, count)))

    @property
    def unigram_bits_per_byte(self) -> float:
        """:func:`unigram_bits_per_byte` of the train stream on the test stream."""
        return unigram_bits_per_byte(self.train_stream, self.test_stream)


def _check_positive(arg: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{arg} must be a positive integer, got {value!r}.")


def split_documents(name: str, documents: Mapping[str, bytes], source: str) -> TextDataset:
    """The :class:`TextDataset` of ``documents`` (name -> bytes) under the fixed split rule."""
    test = {k: v for k, v in documents.items() if in_test_split(name, k)}
    train = {k: v for k, v in documents.items() if k not in test}
    if not train or not test:
        raise ConfigError(
            f"{name}: the split rule left the {'train' if not train else 'test'} split empty "
            f"({len(documents)} documents)."
        )
    return TextDataset(
        name=name,
        train_stream=concatenate(train),
        test_stream=concatenate(test),
        train_documents=tuple(sorted(train)),
        test_documents=tuple(sorted(test)),
        source=source,
    )


def python_docs_documents() -> dict[str, bytes]:
    """The topics of :mod:`pydoc_data.topics` as UTF-8 bytes, by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise DatasetNotFoundError(
            f"Dataset {PYTHON_DOCS!r} not found: this Python has no pydoc_data.topics "
            f"({error}); some distributions package it separately (e.g. Debian's python3-doc)."
        ) from error
    return {name: text.encode("utf-8") for name, text in topics.items()}


def _is_stdlib_source(relative: Path, include_tests: bool) -> bool:
    parts = relative.parts
    if THIRD_PARTY_DIRS & set(parts) or parts[0].startswith("config-"):
        return False
    if relative.name.startswith("_sysconfigdata_"):
        return False
    return include_tests or not TEST_DIRS & set(parts[:-1])


def python_sources_documents(
    stdlib_dir: str | Path | None = None, *, include_tests: bool = True
) -> dict[str, bytes]:
    """The standard library's ``.py`` files (module docstring) by relative POSIX path;
    ``stdlib_dir`` defaults to this interpreter's ``sysconfig.get_paths()["stdlib"]``."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Dataset {PYTHON_SOURCES!r} not found: the standard library directory {root} does "
            "not exist; pass the directory that holds the library's .py files."
        )
    documents = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if path.is_file() and _is_stdlib_source(relative, include_tests):
            documents[relative.as_posix()] = path.read_bytes()
    if not documents:
        raise DatasetNotFoundError(f"Dataset {PYTHON_SOURCES!r} not found: no .py files in {root}.")
    return documents


def load_text(
    name: str, *, stdlib_dir: str | Path | None = None, include_tests: bool = True
) -> TextDataset:
    """The byte-level corpus ``name`` (one of :data:`TEXT_DATASETS`), split by the fixed rule.

    ``stdlib_dir`` and ``include_tests`` apply to ``python_sources`` only.
    """
    if name == PYTHON_DOCS:
        return split_documents(name, python_docs_documents(), "pydoc_data.topics")
    if name == PYTHON_SOURCES:
        root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
        documents = python_sources_documents(root, include_tests=include_tests)
        return split_documents(name, documents, str(root))
    raise ConfigError(f"unknown text dataset {name!r}; choose one of {', '.join(TEXT_DATASETS)}.")


DEFAULT_SEQ_LEN = 128
"""The sequence length of a text dataset opened by name (``lm_tiny``'s context)."""


class TokenSource:
    """A :class:`~sparsejax.data.sources.BatchSource` of a :class:`TextDataset`: example i is
    sequence i of length ``seq_len`` (inputs, next-byte targets), so that the engine's image
    batches become ``(batch, seq_len)`` token batches; ``num_classes`` is the vocabulary and
    ``image_shape`` is ``(seq_len,)``, which the engine passes to the model as ``input_shape``,
    and ``input_dtype`` int32.
    ``num_train`` / ``num_test`` keep the first sequences of a split only."""

    def __init__(
        self,
        data: TextDataset,
        seq_len: int = DEFAULT_SEQ_LEN,
        *,
        num_train: int | None = None,
        num_test: int | None = None,
    ):
        self.data, self.seq_len = data, seq_len
        self.name, self.source, self.num_classes = data.name, data.source, data.vocab_size
        self.image_shape, self.input_dtype = (seq_len,), TOKEN_DTYPE
        train, test = data.num_sequences("train", seq_len), data.num_sequences("test", seq_len)
        self.num_train = min(num_train or train, train)
        self.num_test = min(num_test or test, test)

    def train_batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        return self.data.sequences("train", self.seq_len, indices)

    def test_batch(self, indices: np.ndarray) -> Batch:
        return self.data.sequences("test", self.seq_len, indices)
