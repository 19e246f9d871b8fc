"""Recommender-style Keras models: mixed string / integer / float inputs, one Embedding behind two lookups
with different vocabularies, string inputs that are only hashed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from test_keras_review_fixes import assert_tables_are_the_layers

from converters.keras import convert
from converters.keras_parity import conversion_parity


def test_mixed_string_int_and_float_inputs_run_the_whole_model_check(kmodels: Any, tmp_path: Path) -> None:
    k = kmodels.keras
    kmodels.seed(5)
    category = k.Input((1,), dtype="string", name="category")
    item = k.Input((1,), dtype="int64", name="item_idx")
    price = k.Input((1,), dtype="float32", name="price")
    looked_up = k.layers.StringLookup(vocabulary=["books", "music", "toys"], name="category_lookup")(category)
    cat_vec = k.layers.Flatten()(k.layers.Embedding(4, 4, name="category_emb")(looked_up))
    item_vec = k.layers.Flatten()(k.layers.Embedding(10, 4, name="item_emb")(item))
    out = k.layers.Dense(1, name="head")(k.layers.Concatenate()([cat_vec, item_vec, price]))
    model = k.Model({"category": category, "item_idx": item, "price": price}, out)
    result = convert(model, tmp_path / "s")
    assert_tables_are_the_layers(result, model, ("category_emb", "item_emb"))
    report = conversion_parity(result, backends=("numpy",))  # Keras refused a call mixing tensors and arrays
    assert report, report.to_text()
    assert not report.skipped, [c.detail for c in report.skipped]


def test_one_embedding_behind_two_lookups_with_different_vocabularies_warns(kmodels: Any, tmp_path: Path) -> None:
    k = kmodels.keras
    kmodels.seed(7)
    src, dst = k.Input((1,), dtype="string", name="src_city"), k.Input((1,), dtype="string", name="dst_city")
    src_lookup = k.layers.StringLookup(vocabulary=["paris", "berlin", "rome"], name="src_lookup")
    dst_lookup = k.layers.StringLookup(vocabulary=["rome", "berlin", "paris"], name="dst_lookup")
    city = k.layers.Embedding(4, 4, name="city_emb")
    x = k.layers.Concatenate()([k.layers.Flatten()(city(src_lookup(src))), k.layers.Flatten()(city(dst_lookup(dst)))])
    model = k.Model({"src_city": src, "dst_city": dst}, k.layers.Dense(1, name="head")(x))
    result = convert(model, tmp_path / "s")
    (warning,) = [w for w in result.warnings if "different vocabularies" in w]
    assert "src_lookup, dst_lookup" in warning and "'src_lookup' is stored" in warning
    tokens = ["paris", "berlin", "rome"]
    stored = result.store["city_emb"].vocab
    assert stored is not None and stored.ids(tokens).tolist() == np.asarray(src_lookup(tokens)).tolist()


def test_strings_that_are_only_hashed_skip_the_whole_model_check_with_a_reason(kmodels: Any, tmp_path: Path) -> None:
    k = kmodels.keras
    kmodels.seed(3)
    query = k.Input((1,), dtype="string", name="q")
    hashed = k.layers.Hashing(num_bins=7, name="q_hash")(query)
    model = k.Model(query, k.layers.Dense(1, name="head")(k.layers.Flatten()(k.layers.Embedding(7, 4, name="q_emb")(
        hashed))))
    result = convert(model, tmp_path / "s")
    report = conversion_parity(result, backends=("numpy",))  # raised InputError after the store was written
    assert report, report.to_text()
    assert any("no sample inputs for the whole model" in c.detail and "'q' takes strings" in c.detail
               for c in report.skipped)


def test_each_string_input_is_sampled_from_its_own_lookup(kmodels: Any, tmp_path: Path) -> None:
    from converters.keras_parity import sample_inputs

    k = kmodels.keras
    kmodels.seed(11)
    features = {"city": ["paris", "rome", "oslo"], "user": ["ann", "bob", "cyd", "dan"]}
    inputs = {name: k.Input((1,), dtype="string", name=name) for name in features}
    vectors = [k.layers.Flatten()(k.layers.Embedding(len(v) + 1, 4, name=f"{n}_emb")(
        k.layers.StringLookup(vocabulary=v, name=f"{n}_lookup")(inputs[n]))) for n, v in features.items()]
    model = k.Model(inputs, k.layers.Dense(1, name="head")(k.layers.Concatenate()(vectors)))
    result = convert(model, tmp_path / "s")
    sampled = sample_inputs(model, result.store, batch=40)  # the user input drew city names before
    for name, vocabulary in features.items():
        assert set(sampled[name].ravel()) <= {"[UNK]", *vocabulary}
        assert set(sampled[name].ravel()) & set(vocabulary)
