"""A sentence-pair task made from the shipped Rotten Tomatoes reviews, for data.pair_column.

Each row pairs a review with a claim about its critic ("The critic liked the film." or "... disliked
..."), drawn at random; its label is "yes" when the claim is right about the review and "no" otherwise.
Neither text alone says anything about the label: a model must read both, as in GLUE's pair tasks.

    python benchmarks/claims_pairs.py OUT_DIR    # OUT_DIR/train.csv and OUT_DIR/test.csv

The rows follow declora's own split of the shipped reviews (train and test by movie, data seed 0), so the
held-out claims are about reviews of movies no training row is about. Then, for example:

    declora run data.dataset=OUT_DIR/train.csv data.test_file=OUT_DIR/test.csv \\
        data.text_column=review data.pair_column=claim
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

CLAIMS = ("The critic liked the film.", "The critic disliked the film.")


def write_claims(path: Path, texts: list[str], liked: np.ndarray, seed: int) -> Path:
    """``path`` as a CSV of (review, claim, label) for the reviews ``texts`` whose critic liked the film
    where ``liked`` is true; each claim is drawn with ``seed``."""
    says_liked = np.random.default_rng(seed).random(len(texts)) < 0.5
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["review", "claim", "label"])
        for text, truth, claim in zip(texts, liked, says_liked, strict=True):
            out.writerow([text, CLAIMS[0 if claim else 1], "yes" if truth == claim else "no"])
    return path


def main(out: Path) -> None:
    from declora.config import DataConfig
    from declora.data import load_dataset

    train, test = load_dataset(DataConfig(), 0)  # label 1: fresh (the critic liked it)
    out.mkdir(parents=True, exist_ok=True)
    write_claims(out / "train.csv", train.texts, train.labels == 1, seed=0)
    write_claims(out / "test.csv", test.texts, test.labels == 1, seed=1)
    print(f"{out / 'train.csv'}: {len(train)} rows; {out / 'test.csv'}: {len(test)} rows")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/claims_pairs.py OUT_DIR")
    main(Path(sys.argv[1]))
