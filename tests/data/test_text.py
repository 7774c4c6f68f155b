"""Byte-level text corpora: the fixed split, sequences and batches, the unigram baseline."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from sparsejax.data import text
from sparsejax.errors import ConfigError


def _documents(count: int = 60) -> dict[str, bytes]:
    return {f"doc{i:03d}": f"document {i} says {'ab' * (i % 7)}".encode() for i in range(count)}


def test_split_rule_is_the_documented_hash():
    for name in ("if", "for", "lib/os.py", "asyncio/tasks.py"):
        digest = hashlib.sha256(f"python_sources/{name}".encode()).digest()
        expected = int.from_bytes(digest[:8], "big") < text.TEST_FRACTION * 2**64
        assert text.in_test_split("python_sources", name) == expected


def test_split_is_disjoint_complete_and_independent_of_the_other_documents():
    documents = _documents()
    data = text.split_documents("corpus", documents, "memory")
    assert set(data.train_documents).isdisjoint(data.test_documents)
    assert set(data.train_documents) | set(data.test_documents) == set(documents)
    fewer = {k: v for i, (k, v) in enumerate(sorted(documents.items())) if i % 3}
    smaller = text.split_documents("corpus", fewer, "memory")
    assert set(smaller.test_documents) == set(data.test_documents) & set(fewer)
    assert set(smaller.train_documents) == set(data.train_documents) & set(fewer)


def test_streams_hold_each_split_in_sorted_order_with_end_of_document_bytes():
    documents = _documents()
    data = text.split_documents("corpus", documents, "memory")
    eod = bytes([text.END_OF_DOCUMENT])
    expected = b"".join(documents[n] + eod for n in data.test_documents)
    assert data.test_stream.tobytes() == expected
    assert data.train_stream.size == sum(len(documents[n]) + 1 for n in data.train_documents)


def test_sequences_predict_the_next_byte_and_cover_the_stream():
    data = text.split_documents("corpus", _documents(), "memory")
    seq_len = 7
    inputs, targets = data.sequences("train", seq_len)
    stream = data.train_stream
    assert inputs.shape == (data.num_sequences("train", seq_len), seq_len)
    assert inputs.shape[0] == (stream.size - 1) // seq_len
    assert inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs.reshape(-1), stream[: inputs.size])
    np.testing.assert_array_equal(targets.reshape(-1), stream[1 : inputs.size + 1])


def test_train_batches_are_deterministic_per_seed_and_epoch_and_visit_each_sequence_once():
    data = text.split_documents("corpus", _documents(), "memory")
    seq_len, batch = 5, 4

    def epoch(seed, number):
        return [x for x, _ in data.train_batches(seq_len, batch, seed=seed, epoch=number)]

    first = epoch(0, 0)
    for a, b in zip(first, epoch(0, 0), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, epoch(0, 1)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, epoch(1, 0)))
    count = data.num_sequences("train", seq_len)
    assert len(first) == count // batch
    all_inputs, _ = data.sequences("train", seq_len)
    seen = {row.tobytes() for b in first for row in b}
    assert seen <= {row.tobytes() for row in all_inputs}
    order = data.epoch_order(seq_len, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(count))


def test_test_batches_cover_every_test_sequence_in_order():
    data = text.split_documents("corpus", _documents(), "memory")
    inputs = np.concatenate([x for x, _ in data.test_batches(6, 5)])
    np.testing.assert_array_equal(inputs, data.sequences("test", 6)[0])


def test_unigram_baseline_matches_a_hand_calculation():
    train = np.frombuffer(b"aab", np.uint8)
    test = np.frombuffer(b"abc", np.uint8)
    # add-one smoothing over 256 bytes: p(a) = 3/259, p(b) = 2/259, p(c) = 1/259
    expected = -(math.log2(3 / 259) + math.log2(2 / 259) + math.log2(1 / 259)) / 3
    assert text.unigram_bits_per_byte(train, test) == pytest.approx(expected, rel=1e-12)


def test_python_docs_corpus_splits_by_topic():
    data = text.load_text("python_docs")
    from pydoc_data.topics import topics

    assert set(data.train_documents) | set(data.test_documents) == set(topics)
    assert all(text.in_test_split("python_docs", n) for n in data.test_documents)
    assert data.train_stream.size + data.test_stream.size == sum(
        len(v.encode()) + 1 for v in topics.values()
    )
    assert 0 < data.unigram_bits_per_byte < 8


def test_python_sources_reads_a_stdlib_tree_and_skips_third_party_and_build_files(tmp_path):
    files = {
        "os.py": b"import sys\n",
        "json/decoder.py": b"class JSONDecoder: pass\n",
        "test/test_os.py": b"def test(): pass\n",
        "site-packages/numpy/core.py": b"third party\n",
        "_sysconfigdata__linux.py": b"build_time_vars = {}\n",
        "config-3.11-x86_64/python-config.py": b"build\n",
        "notes.txt": b"not python\n",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    found = text.python_sources_documents(tmp_path)
    assert found == {k: files[k] for k in ("os.py", "json/decoder.py", "test/test_os.py")}
    library = text.python_sources_documents(tmp_path, include_tests=False)
    assert set(library) == {"os.py", "json/decoder.py"}


def test_bad_names_and_lengths_are_config_errors():
    with pytest.raises(ConfigError, match="unknown text dataset"):
        text.load_text("wikipedia")
    data = text.split_documents("corpus", _documents(), "memory")
    with pytest.raises(ConfigError, match="seq_len"):
        data.num_sequences("train", 0)
    with pytest.raises(ConfigError, match="split"):
        data.stream("validation")


def test_token_source_serves_sequences_as_the_engine_reads_examples():
    data = text.split_documents("corpus", _documents(), "memory")
    source = text.TokenSource(data, seq_len=6, num_test=3)
    assert source.image_shape == (6,) and source.num_classes == 256
    assert source.num_train == data.num_sequences("train", 6) and source.num_test == 3
    inputs, targets = source.train_batch(np.asarray([4, 1]), np.random.default_rng(0))
    expected = data.sequences("train", 6, np.asarray([4, 1]))
    np.testing.assert_array_equal(inputs, expected[0])
    np.testing.assert_array_equal(targets, expected[1])
    first_test = data.sequences("test", 6)[0][:2]
    np.testing.assert_array_equal(source.test_batch(np.arange(2))[0], first_test)
