"""`make demo`: the main job of embedding-bridge on the bundled example, end to end.

1. train a tiny review classifier (StringLookup -> Embedding -> mean -> Dense) on the shipped corpus;
2. save it as .keras and convert it: OUT/model.onnx + the embedding store (tables, vocabulary);
3. prove parity: Keras's own layer, the ONNX model's Gather, and numpy/onnxruntime/torch, bit for bit;
4. look words up through every backend, and show where everything is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import bridge  # noqa: E402
from bridge.backends import lookup  # noqa: E402
from bridge.render import format_table, human_bytes  # noqa: E402


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="output directory (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()

    step("1. training the example classifier on examples/data/reviews.tsv")
    from text_classifier import build_and_train, pad, read_corpus

    model = build_and_train(epochs=args.epochs)
    texts, labels = read_corpus()
    work = out.parent / f"{out.name.removesuffix('-out')}-work"
    work.mkdir(parents=True, exist_ok=True)
    keras_path = work / "review_classifier.keras"
    model.save(keras_path)
    print(f"trained {model.name} ({model.count_params()} parameters), saved to {keras_path}")

    step("2. converting: Keras -> ONNX (tf2onnx) -> embedding store")
    from converters.keras import convert
    from converters.keras_parity import conversion_parity

    result = convert(keras_path, out, force=True)
    rows = [[t.name, ", ".join(s.layer for s in t.sources) or "(unmapped)", f"{t.rows}x{t.dim}", str(t.dtype),
             human_bytes(t.nbytes), f"{len(t.vocab)} tokens" if t.vocab else "-"] for t in result.tables]
    print(format_table(["table", "source layer", "shape", "dtype", "bytes", "vocabulary"], rows))
    for warning in result.warnings:
        print(f"warning: {warning}")

    step("3. parity: Keras layer, ONNX model and every backend on the same ids")
    sample = {"tokens": pad(texts[:8]).astype(object)}
    report = conversion_parity(result, inputs=sample)
    print(report.to_text())
    report_path = work / "parity.md"
    report_path.write_text(report.to_markdown(), encoding="utf-8")

    step("4. serving words from the store through every backend")
    store = bridge.open_store(out)
    table = store["tok_emb"]
    words = ["great", "terrible", "kettle", "no-such-word"]
    vectors = {name: lookup(table, name).tokens(words) for name in ("numpy", "onnxruntime", "torch")}
    same = all(v.tobytes() == vectors["numpy"].tobytes() for v in vectors.values())
    ids = table.vocab.ids(words) if table.vocab else np.array([])
    for word, i, vec in zip(words, ids, vectors["numpy"], strict=True):
        print(f"{word!r:16} id {int(i):3d}  {np.array2string(vec[:4], precision=4)} ...")
    print(f"numpy, onnxruntime and torch return identical bytes: {same}")
    print("note: unknown words map to the StringLookup OOV id 0; the Keras layer has mask_zero=True, so the model"
          " masks id 0 (a mask, not a padding row)")

    step("done")
    elapsed = time.perf_counter() - started
    print(f"""in {elapsed:.0f} s. Files:
  {out}/model.onnx           the converted model (runs in onnxruntime)
  {out}/manifest.json        the store's index: tables, shapes, dtypes, sha256, sources
  {out}/tables/tok_emb.npy   the embedding matrix (np.load(..., mmap_mode="r"))
  {out}/vocab/tok_emb.txt    its vocabulary, one token per line, line number = id
  {report_path}     the parity report (Markdown)
  {keras_path}  the trained Keras model
Try:  .venv/bin/embridge inspect {out}/model.onnx
      .venv/bin/embridge lookup {out} --table tok_emb --tokens great,awful --backend torch
      .venv/bin/embridge parity {out} --keras {keras_path}""")
    return 0 if report and same else 1


if __name__ == "__main__":
    sys.exit(main())
