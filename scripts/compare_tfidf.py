#!/usr/bin/env python
"""Rotten Tomatoes (or any classifier corpus): tfx against a TF-IDF + logistic-regression baseline
on the same split, printing test accuracy and macro-F1 of each.

    python scripts/compare_tfidf.py [--corpus rotten-tomatoes] [--steps 1500] [--pretrained]

--pretrained also runs masked-LM pretraining (recipes/classifier/mlm-movie-reviews.toml) and
the fine-tuned classifier. Needs scikit-learn (pip install -e ".[dev]").
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from tfxrun import REPO, tfx


def read_tsv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def baseline(root: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    x_train, y_train = read_tsv(root / "train.tsv")
    x_test, y_test = read_tsv(root / "test.tsv")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform(x_train), y_train)
    pred = clf.predict(vec.transform(x_test))
    return {"accuracy": accuracy_score(y_test, pred), "macro_f1": f1_score(y_test, pred, average="macro")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="rotten-tomatoes")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps")
    ap.add_argument("--pretrained", action="store_true")
    ap.add_argument("--baseline-only", action="store_true", help="only TF-IDF + LR (no tfx training)")
    args = ap.parse_args()
    root = REPO / tfx("data", "get", args.corpus).strip()  # tfx runs in the repository: a relative path
    rows = [("TF-IDF + logistic regression", baseline(root))]
    if args.baseline_only:
        print(f"TF-IDF + logistic regression on {args.corpus} test: accuracy {rows[0][1]['accuracy']:.4f}, "
              f"macro-F1 {rows[0][1]['macro_f1']:.4f}")
        return
    extra = ["--set", f"train.steps={args.steps}"] if args.steps else []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = REPO / "recipes/classifier" / f"{args.corpus}.toml"
        tfx("train", str(recipe), *extra, "--out", f"{tmp}/clf")
        rows.append(("tfx " + recipe.name, json.loads(tfx("eval", f"{tmp}/clf", "--split", "test", "--json"))))
        if args.pretrained:
            tfx("train", str(REPO / "recipes/classifier/mlm-movie-reviews.toml"), "--out", f"{tmp}/mlm")
            tfx("train", str(REPO / "recipes/classifier/rotten-tomatoes-pretrained.toml"), *extra,
                "--set", f"init_from={tmp}/mlm", "--out", f"{tmp}/ft")
            rows.append(("tfx MLM-pretrained + fine-tuned",
                         json.loads(tfx("eval", f"{tmp}/ft", "--split", "test", "--json"))))
    print(f"{'':<36} {'accuracy':>9} {'macro-F1':>9}")
    for name, r in rows:
        print(f"{name:<36} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f}")


if __name__ == "__main__":
    main()
