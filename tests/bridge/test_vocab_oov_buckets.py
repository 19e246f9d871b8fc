"""Vocabularies with several hashed OOV buckets (Keras ``num_oov_indices > 1``).

Keras hashes each unknown token (the OOV token ``[UNK]`` included) into one of the OOV ids; the
bridge does not reproduce the hash, so an unknown token is refused with a :class:`VocabularyError`
that names it and says what to do, on every backend and policy; known tokens keep their ids. The
buckets are the ``oov``, ``oov_1``, ... entries of ``reserved``, which the store saves and loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bridge import EmbeddingTable, Vocabulary, lookup, open_store, write_store
from bridge.errors import VocabularyError

TOKENS = ["[PAD]", "[UNK]", "[UNK]", "the", "cat"]  # mask 0, OOV buckets 1 and 2 (Keras's layout)
RESERVED = {"mask": 0, "oov": 1, "oov_1": 2}


def _vocab() -> Vocabulary:
    return Vocabulary(list(TOKENS), oov_id=1, reserved=dict(RESERVED), source="string_lookup")


def _table(vocab: Vocabulary) -> EmbeddingTable:
    data = np.arange(len(vocab) * 3, dtype=np.float32).reshape(len(vocab), 3) / 7.0
    return EmbeddingTable("emb", data, vocab=vocab, oov_id=vocab.oov_id)


def test_oov_buckets_counts_the_reserved_oov_ids() -> None:
    assert _vocab().oov_buckets == 2
    assert Vocabulary(["", "[UNK]", "a"], oov_id=1, reserved={"mask": 0, "oov": 1}).oov_buckets == 1
    assert Vocabulary(["a", "b"]).oov_buckets == 0


def test_known_tokens_keep_their_ids() -> None:
    assert _vocab().ids(["the", "cat", "[PAD]"]).tolist() == [3, 4, 0]
    assert _vocab().ids("cat").tolist() == 4


@pytest.mark.parametrize("unknown", ["zebra", "[UNK]"])  # Keras hashes its own OOV token too
def test_unknown_token_is_refused_naming_token_buckets_and_remedy(unknown: str) -> None:
    with pytest.raises(VocabularyError) as info:
        _vocab().ids(["the", unknown])
    text = str(info.value)
    assert repr(unknown) in text and "position 1" in text
    assert "2 OOV buckets" in text and "ids 1, 2" in text and "does not reproduce" in text
    assert "lookup(ids)" in text and "missing=" in text


def test_an_explicit_missing_id_is_used() -> None:
    assert _vocab().ids(["zebra", "the", "[UNK]"], missing=2).tolist() == [2, 3, 2]
    assert _vocab().ids(["zebra"], missing=-1).tolist() == [-1]


def test_integer_lookup_message_names_floormod() -> None:
    vocab = Vocabulary(["-1", "-1", "10"], oov_id=0, reserved={"oov": 0, "oov_1": 1}, source="integer_lookup")
    with pytest.raises(VocabularyError, match="token % N"):
        vocab.ids(["7"])


def test_a_single_oov_id_still_takes_unknown_tokens() -> None:
    vocab = Vocabulary(["", "[UNK]", "the"], oov_id=1, reserved={"mask": 0, "oov": 1})
    assert vocab.ids(["zebra", "[UNK]", "the", ""]).tolist() == [1, 1, 2, 0]


def test_buckets_survive_the_store(tmp_path: Path) -> None:
    write_store(tmp_path / "s", [_table(_vocab())])
    loaded = open_store(tmp_path / "s")["emb"].vocab
    assert loaded is not None and loaded.oov_buckets == 2 and loaded.reserved == RESERVED
    with pytest.raises(VocabularyError, match="2 OOV buckets"):
        loaded.ids(["zebra"])


@pytest.mark.parametrize("policy", ["error", "zero", "oov", "clip"])
@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torch"])
def test_token_lookups_refuse_unknown_tokens_on_every_backend(tmp_path: Path, backend: str, policy: str) -> None:
    table = write_store(tmp_path / "s", [_table(_vocab())])["emb"]
    served = lookup(table, backend=backend, policy=policy)
    got = served.tokens(["cat", "the"])
    assert got.tobytes() == table.data[[4, 3]].tobytes()
    with pytest.raises(VocabularyError, match="'zebra'"):
        served.tokens(["cat", "zebra"])


def test_keras_string_lookup_vocabulary_matches_keras_for_known_tokens() -> None:
    from converters.keras_env import import_keras
    from converters.keras_vocab import lookup_vocabulary

    tf, keras = import_keras()
    layer = keras.layers.StringLookup(vocabulary=["the", "cat"], mask_token="[PAD]", num_oov_indices=2)
    found = lookup_vocabulary(layer, "lookup")
    vocab = found.vocabulary
    assert vocab.reserved == RESERVED and vocab.oov_buckets == 2 and vocab.oov_id == 1
    known = ["the", "cat", "[PAD]"]
    assert vocab.ids(known).tolist() == np.asarray(layer(tf.constant(known))).tolist()
    for unknown in ["zebra", "[UNK]"]:
        assert int(np.asarray(layer(tf.constant([unknown])))[0]) in (1, 2)  # hashed by Keras
        with pytest.raises(VocabularyError, match="2 OOV buckets"):
            vocab.ids([unknown])
    assert "FarmHash64" in found.metadata["oov_hashing"] and "VocabularyError" in found.metadata["oov_hashing"]


def test_buckets_without_an_oov_id_still_refuse_unknown_tokens_under_zero() -> None:
    """policy='zero' hands unknown tokens to the policy only where the vocabulary has no hashed buckets."""
    import bridge
    from bridge import EmbeddingTable, Vocabulary
    from bridge.errors import VocabularyError

    vocab = Vocabulary(["", "[UNK]", "[UNK]", "cat"], reserved={"oov": 1, "oov_1": 2})
    table = EmbeddingTable("t", np.ones((4, 2), np.float32), vocab=vocab)
    lookup = bridge.lookup(table, "numpy", "zero")
    assert lookup.tokens(["cat"]).shape == (1, 2)
    with pytest.raises(VocabularyError, match="dog"):
        lookup.tokens(["dog"])


def test_vocabulary_ids_must_be_integers() -> None:
    from bridge import Vocabulary
    from bridge.errors import InputError

    with pytest.raises(InputError, match="oov_id must be an integer id, got True"):
        Vocabulary(["a", "b"], oov_id=True)
