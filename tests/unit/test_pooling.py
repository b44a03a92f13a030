"""model.pooling: the head reads the mean of the real tokens' states (or the [CLS] pooler); the exported
folder's README recipe, run with stock transformers + PEFT, gives declora's logits."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from declora.config import ConfigError, ModelConfig, load_config
from declora.model import build_federation, node_adapter
from declora.peft_io import export_peft
from declora.pooling import POOLING_FILE, masked_mean, mean_head_input

pytestmark = pytest.mark.unit
TEXTS = ["a fine and moving film", "dull", "great fun from start to end, with a sad plot in the middle"]


def _randomize(fed, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fed.tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def st_bert(tiny_bert, tmp_path_factory):
    """The tiny BERT as a sentence-transformers folder that pools mean tokens."""
    folder = tmp_path_factory.mktemp("st-bert") / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def test_auto_reads_the_folders_pooling_config(tiny_bert, st_bert):
    assert build_federation(ModelConfig(name=str(st_bert), rank=2), 1, 2).pooling == "mean"
    assert build_federation(ModelConfig(name=str(tiny_bert), rank=2), 1, 2).pooling == "cls"
    assert build_federation(ModelConfig(name=str(st_bert), rank=2, pooling="cls"), 1, 2).pooling == "cls"


def test_masked_mean_ignores_padding():
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(masked_mean(hidden, mask)[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(masked_mean(hidden, mask)[1], hidden[1].mean(0))


def test_mean_pooled_logits_do_not_depend_on_padding(tiny_bert):
    fed = build_federation(ModelConfig(name=str(tiny_bert), rank=4, pooling="mean"), 1, 2)
    _randomize(fed)
    ids = torch.randint(1000, 2000, (1, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad(), fed.route(torch.zeros(1, dtype=torch.long)):
        short = fed(ids, torch.ones_like(ids))
        long = fed(padded, mask)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [("query", "value"), ("query", "value", "dense")])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_exported_readme_recipe_with_stock_peft_gives_our_logits(st_bert, tmp_path, pooling, targets):
    # "dense" also names BERT's pooler: adapted when the head reads it (cls), left alone otherwise, in
    # declora and in the exported PEFT config alike.
    from transformers import AutoTokenizer

    fed = build_federation(  # 3 labels: the saved base's 2-label head must give way to the folder's
        ModelConfig(name=str(st_bert), rank=4, alpha=8, pooling=pooling, target_modules=targets),
        n=3,
        num_labels=3,
    )
    pooler_adapted = any("pooler" in name for name in fed.lora)
    assert pooler_adapted == (pooling == "cls" and "dense" in targets)
    _randomize(fed)
    node = 1
    batch = AutoTokenizer.from_pretrained(str(st_bert))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), fed.route(torch.full((len(TEXTS),), node)):
        ours = fed(batch["input_ids"], batch["attention_mask"])
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    folder = export_peft(fed, node_adapter(fed, stacked, node), tmp_path / "adapter")
    note = json.loads((folder / POOLING_FILE).read_text())
    expected = {"pooling": pooling, "num_labels": 3, "max_length": fed.cfg.max_length}
    assert note == (expected if pooling == "cls" else {**expected, "head_input": "vector"})
    excluded = json.loads((folder / "adapter_config.json").read_text())["exclude_modules"]
    assert (excluded or []) == (["bert.pooler.dense"] if "dense" in targets and pooling == "mean" else [])
    readme = (folder / "README.md").read_text()
    if pooling == "cls":  # the README's one line, as a user would type it
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        line = re.search(r"`(PeftModel\.from_pretrained\(.*?, FOLDER\))`", readme, re.S).group(1)
        scope = {"BASE": str(st_bert), "FOLDER": str(folder), "PeftModel": PeftModel}
        scope["AutoModelForSequenceClassification"] = AutoModelForSequenceClassification
        with torch.no_grad():
            theirs = eval(line, scope).eval()(**batch).logits
    else:  # run the README's own code block, as a user would
        code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
        scope = {"BASE": str(st_bert), "FOLDER": str(folder), "texts": TEXTS}
        exec(code, scope)
        theirs = scope["logits"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[0], ours[1])  # the texts are told apart: a real forward


def test_an_export_that_excludes_the_unread_pooler_seeds_a_run_again(st_bert, tmp_path):
    # Mean pooling with "dense" among the targets: the export lists the pooler in exclude_modules, which a
    # stock PEFT feature declora otherwise refuses; its own export must still seed a run exactly.
    from transformers import AutoTokenizer

    from declora.peft_io import import_peft
    from declora.preflight import check_adapter

    overrides = [
        "model.rank=4",
        "model.alpha=8",
        "model.pooling=mean",
        "model.target_modules=[query,value,dense]",
    ]
    cfg = load_config(None, [f"model.name={st_bert}", *overrides])
    fed = build_federation(cfg.model, n=2, num_labels=2)
    _randomize(fed)
    folder = export_peft(
        fed, node_adapter(fed, {k: v.detach() for k, v in fed.tensors().items()}, 1), tmp_path / "a"
    )
    assert json.loads((folder / "adapter_config.json").read_text())["exclude_modules"] == [
        "bert.pooler.dense"
    ]
    check_adapter(cfg, folder)  # accepted
    seeded = build_federation(cfg.model, n=2, num_labels=2)
    import_peft(seeded, folder)
    batch = AutoTokenizer.from_pretrained(str(st_bert))(TEXTS, padding=True, return_tensors="pt")
    with (
        torch.no_grad(),
        fed.route(torch.full((len(TEXTS),), 1)),
        seeded.route(torch.zeros(len(TEXTS), dtype=torch.long)),
    ):
        torch.testing.assert_close(
            seeded(batch["input_ids"], batch["attention_mask"]),
            fed(batch["input_ids"], batch["attention_mask"]),
            atol=1e-5,
            rtol=0,
        )
    other = json.loads((folder / "adapter_config.json").read_text())
    other["exclude_modules"] = ["bert.encoder.layer.0.attention.self.query"]  # a layer the run adapts
    (folder / "adapter_config.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="exclude_modules"):
        check_adapter(cfg, folder)
    with pytest.raises(ConfigError, match="exclude_modules"):  # from Python, without the preflight too
        import_peft(build_federation(cfg.model, n=2, num_labels=2), folder)
    other["exclude_modules"], other["lora_alpha"] = ["bert.pooler.dense"], 16  # twice the run's scale
    (folder / "adapter_config.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"scales its update by 4 \(lora_alpha=16, r=4, rslora=False\)"):
        import_peft(build_federation(cfg.model, n=2, num_labels=2), folder)


class _LastPositionHead(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.out = torch.nn.Linear(hidden, 2)

    def forward(self, states):
        return self.out(states[:, -1])


def test_a_head_is_handed_the_mean_as_it_reads_states(tiny_bert):
    """A linear head gets the mean as a vector; a head that reads the first position of the states it is
    given (RoBERTa's) gets a one-position sequence; any other head cannot read the mean."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    assert mean_head_input(model) == "vector"
    roberta_head = RobertaClassificationHead(RobertaConfig(hidden_size=32, num_labels=2))
    roberta_head.train()
    for head, expected in [
        (roberta_head, "sequence"),
        (_LastPositionHead(32), None),
        (torch.nn.Linear(16, 2), None),  # not on the hidden state
        (torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)), None),
    ]:
        model.classifier = head
        assert mean_head_input(model) == expected, head
    assert roberta_head.training  # the probe left the head's mode as it found it


def test_mean_pooling_needs_a_head_that_can_read_the_mean(tmp_path):
    # Funnel's head runs on the first token's state it is handed as a vector: it cannot take the mean.
    from transformers import AutoTokenizer, FunnelConfig, FunnelForSequenceClassification

    from declora.assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(str(model_path("minilm")))
    config = FunnelConfig(
        vocab_size=tokenizer.vocab_size, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32
    )
    FunnelForSequenceClassification(config).save_pretrained(tmp_path / "funnel")
    with pytest.raises(
        ValueError,
        match=r"model.pooling='mean' needs a classifier.*FunnelClassificationHead.*model.pooling=cls",
    ):
        build_federation(ModelConfig(name=str(tmp_path / "funnel"), rank=2, pooling="mean"), 1, 2)
    funnel = ModelConfig(name=str(tmp_path / "funnel"), rank=2, target_modules=("q_head", "v_head"))
    assert build_federation(funnel, 1, 2).pooling == "cls"
    with pytest.raises(ConfigError, match=r"target_modules=auto knows no attention projections of this funn"):
        build_federation(ModelConfig(name=str(tmp_path / "funnel"), rank=2, pooling="cls"), 1, 2)


def test_config_refuses_mean_pooling_for_a_causal_lm():
    with pytest.raises(ConfigError, match=r"model.pooling='mean' is for encoder classifiers"):
        load_config(
            None,
            ["task.kind=causal_lm", "model.head=none", "eval.headline=ppl_avg_factors", "model.pooling=mean"],
        )
    with pytest.raises(ConfigError, match=r"model.pooling='max' is not allowed.*auto.*mean.*cls"):
        load_config(None, ["model.pooling=max"])


ARCHITECTURES = {  # model class, config class, extra config, auto's LoRA targets, how the head takes the mean
    "albert": ("AlbertModel", "AlbertConfig", {"embedding_size": 16}, ("query", "value"), "vector"),
    "deberta-v2": ("DebertaV2Model", "DebertaV2Config", {}, ("query_proj", "value_proj"), "vector"),
    "roberta": ("RobertaModel", "RobertaConfig", {}, ("query", "value"), "sequence"),
    "xlm-roberta": ("XLMRobertaModel", "XLMRobertaConfig", {}, ("query", "value"), "sequence"),
    "mpnet": ("MPNetModel", "MPNetConfig", {}, ("q", "v"), "sequence"),
    "electra": ("ElectraModel", "ElectraConfig", {"embedding_size": 32}, ("query", "value"), "sequence"),
    "deberta": ("DebertaModel", "DebertaConfig", {}, ("in_proj",), "vector"),  # one fused q/k/v layer
    "roformer": ("RoFormerModel", "RoFormerConfig", {"embedding_size": 32}, ("query", "value"), "sequence"),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sentence_models_of_each_family_read_the_mean_as_stock_peft_reproduces(arch, tmp_path):
    """A sentence-transformers folder of each family: auto pooling reads the mean, and the exported
    README's recipe, run with stock transformers + PEFT, gives declora's logits."""
    import transformers
    from transformers import AutoTokenizer

    from declora.assets import model_path

    model_cls, config_cls, extra, targets, head_input = ARCHITECTURES[arch]
    tokenizer = AutoTokenizer.from_pretrained(str(model_path("minilm")))
    config = getattr(transformers, config_cls)(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    base = tmp_path / arch
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    fed = build_federation(ModelConfig(name=str(base), rank=2), n=2, num_labels=3)  # target_modules: auto
    assert (fed.pooling, fed.head_input, fed.targets) == ("mean", head_input, targets)
    _randomize(fed)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), fed.route(torch.full((len(TEXTS),), 1)):
        ours = fed(batch["input_ids"], batch["attention_mask"])
    stacked = {k: v.detach() for k, v in fed.tensors().items()}
    folder = export_peft(fed, node_adapter(fed, stacked, 1), tmp_path / "adapter")
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    scope = {"BASE": str(base), "FOLDER": str(folder), "texts": TEXTS}
    exec(code, scope)
    torch.testing.assert_close(ours, scope["logits"], atol=1e-5, rtol=0)
    assert not torch.allclose(ours[0], ours[1])
