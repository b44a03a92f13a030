"""Sentence-pair classification (data.pair_column) on the shipped MiniLM: rows are tokenized as the
tokenizer joins two texts, the model sees BERT's token types, and the exported adapter predicts with stock
PEFT and tokenizer(text, pair) what declora evaluated."""

from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from declora.cli import main
from declora.config import ConfigError, DataConfig, load_config

pytestmark = pytest.mark.integration
# benchmarks/claims_pairs.py: reviews paired with claims about their critic, the docs' pair task
MAKER = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "claims_pairs.py"))
CLAIMS = MAKER["CLAIMS"]


def write_claims(path: Path, rows: int, start: int) -> Path:
    """The pair task on the shipped training reviews ``start`` to ``start + rows``."""
    from declora.data import load_dataset

    reviews, _ = load_dataset(DataConfig(), 0)
    texts, liked = reviews.texts[start : start + rows], reviews.labels[start : start + rows] == 1
    return MAKER["write_claims"](path, texts, liked, seed=start)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from declora.assets import model_path

    return AutoTokenizer.from_pretrained(str(model_path("minilm")))


def test_segment_ids_are_the_tokenizers_token_types(minilm_tokenizer):
    from declora.model import segment_ids

    a = ["a gripping , funny film", "dull", "an hour too long, and every minute of it felt"]
    b = [CLAIMS[0], CLAIMS[1] + " Very much so.", CLAIMS[0]]
    enc = minilm_tokenizer(a, b, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    derived = segment_ids(enc["input_ids"], minilm_tokenizer.sep_token_id)
    assert torch.equal(derived[real], enc["token_type_ids"][real])
    assert enc["token_type_ids"][real].sum() > 0  # the second texts are segment 1
    single = minilm_tokenizer(a, padding=True, return_tensors="pt")  # one text a row: segment 0 only
    assert not segment_ids(single["input_ids"], minilm_tokenizer.sep_token_id)[
        single["attention_mask"].bool()
    ].any()


def test_pairs_are_tokenized_and_cut_as_the_tokenizer_does(minilm_tokenizer):
    from declora.data import count_cut, tokenize

    a = ["a gripping , funny film that never lets go of its audience", "dull"]
    b = [CLAIMS[0], CLAIMS[1]]
    rows = tokenize(a, minilm_tokenizer, 12, b)
    assert rows == minilm_tokenizer(a, b, truncation=True, max_length=12)["input_ids"]
    assert [row.count(minilm_tokenizer.sep_token_id) for row in rows] == [2, 2]  # both texts in each row
    assert count_cut(a, rows, minilm_tokenizer, 12, b) == 1  # the long review's pair was cut


def test_the_head_reads_the_pair_with_its_segments():
    """The pooled head's logits with the derived token types are the model's with the tokenizer's, and
    differ from the logits without them: MiniLM embeds the two segments apart."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from declora.assets import model_path
    from declora.model import segment_ids, takes_segments
    from declora.pooling import pooled_logits

    path = str(model_path("minilm"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    assert takes_segments(model)
    enc = tokenizer(["a gripping , funny film", "dull"], list(CLAIMS), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        theirs = pooled_logits(model, ids, mask, "vector", token_type_ids=enc["token_type_ids"])
        ours = pooled_logits(
            model, ids, mask, "vector", token_type_ids=segment_ids(ids, tokenizer.sep_token_id)
        )
        none = pooled_logits(model, ids, mask, "vector")
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, none, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.pair_column=claim"], "data.pair_column='claim' has no effect with the shipped"),
        (
            ["data.dataset=DATA", "data.pair_column=claim", "task.kind=causal_lm", "model.name=smollm2"],
            "data.pair_column='claim' has no effect with task.kind=causal_lm",
        ),
        (  # a prompt template takes the second text where it says {pair}
            ["data.dataset=DATA", "data.pair_column=claim", "task.kind=label_words", "model.head=none"],
            "must contain {pair} exactly once with data.pair_column='claim'",
        ),
        (
            [
                "data.dataset=DATA",
                "task.kind=label_words",
                "model.head=none",
                "task.template='{text}{pair}:'",
            ],
            "has {pair}, and no data.pair_column gives a second text",
        ),
        (["data.dataset=DATA", "data.text_column=review", "data.pair_column=review"], "are both 'review'"),
        (["data.dataset=DATA", "data.text_column=review", "data.pair_column=label"], "are both 'label'"),
    ],
)
def test_a_pair_column_that_would_not_be_read_is_refused(tmp_path, overrides, message):
    data = write_claims(tmp_path / "claims.csv", 8, 0)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [o.replace("DATA", str(data)) for o in overrides])


def test_a_missing_pair_column_is_named(tmp_path, capsys):
    data = write_claims(tmp_path / "claims.csv", 40, 0)
    run_dir = tmp_path / "run"
    args = [f"data.dataset={data}", "data.text_column=review", "data.pair_column=hypothesis"]
    assert main(["run", "configs/smoke.yaml", *args, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.pair_column='hypothesis' is not a column of" in err and "'claim'" in err
    assert not run_dir.exists()


def test_a_pair_run_exports_what_stock_peft_reads_with_both_texts(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from declora.assets import model_path
    from declora.experiment import build_experiment

    train = write_claims(tmp_path / "train.csv", 64, 0)
    test = write_claims(tmp_path / "test.csv", 48, 64)
    run_dir = tmp_path / "run"
    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    pair = [
        f"data.dataset={train}",
        f"data.test_file={test}",
        "data.text_column=review",
        "data.pair_column=claim",
        "data.train_limit=null",
        "data.test_limit=null",
        "model.max_length=64",
        "export=consensus",
    ]
    assert main(["run", str(smoke), *pair, f"run_dir={run_dir}"]) == 0
    assert build_experiment(load_config(smoke, [*pair, "run_dir=x"])).fed.segment_sep == 102  # [SEP]
    assert build_experiment(load_config(smoke, ["run_dir=x"])).fed.segment_sep is None  # one text a row

    rows = list(csv.DictReader(test.open()))
    path = str(model_path("minilm"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    folder = run_dir / "adapters" / "consensus"
    id2label = json.loads((folder / "declora_adapter.json").read_text())["id2label"]
    names = [id2label[str(i)] for i in range(len(id2label))]
    assert "data.pair_column" in (folder / "README.md").read_text()  # the card says how to tokenize
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), str(folder)
    ).eval()
    batch = tokenizer(
        [r["review"] for r in rows],
        [r["claim"] for r in rows],
        padding=True,
        truncation=True,
        max_length=64,
        return_tensors="pt",
    )
    with torch.no_grad():  # the folder README's recipe for mean pooling, with the tokenizer's token types
        inner = model.get_base_model()
        hidden = inner.base_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        preds = inner.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).argmax(-1).numpy()
    truth = np.array([names.index(r["label"]) for r in rows])
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert float((preds == truth).mean()) == pytest.approx(last["acc_avg_factors"], abs=1e-6)  # fp32 log
    tp, fp, fn = [int(((preds == a) & (truth == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
    assert last["f1_avg_factors"] == pytest.approx(2 * tp / max(1, 2 * tp + fp + fn), abs=1e-6)  # of "yes"
    tn = len(truth) - tp - fp - fn
    spread = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert last["mcc_avg_factors"] == pytest.approx((tp * tn - fp * fn) / spread if spread else 0.0, abs=1e-6)
