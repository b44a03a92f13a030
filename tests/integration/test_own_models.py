"""A user's own model folders: other heads than BERT's (DistilBERT's two layers, LLaMA's bias-free score
that reads the last real token) train, export and load with stock PEFT to the logits declora computed;
folders that would run silently wrong (random frozen weights, no tokenizer, no pad id, a misspelt
target module) are refused with one line before any work."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import WORDS, write_tiny_data
from safetensors.torch import load_file

from declora.config import ConfigError, load_config
from declora.engine import run
from declora.experiment import build_experiment
from declora.model import averaged_factors
from declora.tasks import LabelWords
from declora.train import pad

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_threads")]


def _texts(n: int) -> list[str]:
    """Texts of 2 to 8 words, so that batches really pad."""
    return [" ".join(WORDS[(i * k + k) % 10] for k in range(2 + i % 7)) for i in range(n)]


def _overrides(folder, tmp_path, *extra: str) -> list[str]:
    data = write_tiny_data(tmp_path / "train.jsonl", 48)
    return [
        f"model.name={folder}",
        *("model.rank=2", "model.max_length=16", f"data.dataset={data}", "nodes=2", "rounds=2"),
        *("train.batch_size=4", "train.lr=0.05", "eval.node_examples=4", "threads=1", "export=consensus"),
        f"run_dir={tmp_path / 'run'}",
        *extra,
    ]


def _consensus_logits(exp, ids: list[list[int]]) -> torch.Tensor:
    """declora's logits of the consensus adapter (every node set to it) for rows padded with its pad id."""
    stacked = averaged_factors({k: v.detach() for k, v in exp.fed.tensors().items()})
    input_ids, mask = pad(ids, exp.pad_id)
    with torch.no_grad(), exp.fed.override(stacked), exp.fed.route(torch.zeros(len(ids), dtype=torch.long)):
        return exp.fed(input_ids, mask)


def _check_stock_peft_gives_consensus_logits(exp) -> torch.Tensor:
    """The exported consensus folder, loaded by its README's lines, gives declora's consensus logits on
    12 padded texts, and so does each text alone (padding changes nothing); returns declora's logits."""
    model = _readme_model(exp.run_dir / "adapters" / "consensus")
    tokenizer = exp.task.tokenizer
    ids = [tokenizer(t, truncation=True, max_length=16)["input_ids"] for t in _texts(12)]
    batch = tokenizer(_texts(12), padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits
    ours = _consensus_logits(exp, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, torch.cat([_consensus_logits(exp, [x]) for x in ids]), atol=1e-5, rtol=0)
    return ours


def _save_tiny(folder, model, tokenizer):
    """A model built from its config, saved with the MiniLM tokenizer as a local model folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bert_sized(config_cls, tokenizer, **extra):
    """A 1-layer config of the BERT family's field names, hidden 32, on the MiniLM vocabulary."""
    sizes = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    return config_cls(vocab_size=tokenizer.vocab_size, **sizes, **extra)


def _readme_model(folder):
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # the folder's own loading lines, as a user runs them
    return scope["model"].eval()


@pytest.fixture(scope="module")
def distilbert_without_head(tmp_path_factory, minilm_tokenizer):
    """A DistilBERT base saved without its classification head (as the public checkpoints are)."""
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=minilm_tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64
    )
    torch.manual_seed(0)
    return _save_tiny(tmp_path_factory.mktemp("distilbert"), DistilBertModel(config), minilm_tokenizer)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from declora.assets import model_path

    return AutoTokenizer.from_pretrained(str(model_path("minilm")))


def test_distilbert_trains_its_two_head_layers_and_exports_what_stock_peft_loads(
    distilbert_without_head, tmp_path
):
    exp = build_experiment(
        load_config(None, _overrides(distilbert_without_head, tmp_path, "model.target_modules=[q_lin,v_lin]"))
    )
    assert sorted(exp.fed.heads) == ["classifier", "pre_classifier"]  # both train: neither stays random
    start = exp.fed.heads["pre_classifier"].weight.detach().clone()
    run(exp)
    assert not torch.equal(exp.fed.heads["pre_classifier"].weight.detach(), start)
    folder = exp.run_dir / "adapters" / "consensus"
    assert {"base_model.model.pre_classifier.weight", "base_model.model.classifier.weight"} <= set(
        load_file(str(folder / "adapter_model.safetensors"))
    )
    model = _readme_model(folder)  # loaded twice, the head is the same: nothing random is left
    tokenizer = exp.task.tokenizer
    ids = [tokenizer(t, truncation=True, max_length=16)["input_ids"] for t in _texts(12)]
    input_ids, mask = pad(ids, exp.pad_id)
    with torch.no_grad():
        theirs = model(input_ids=input_ids, attention_mask=mask).logits
        again = _readme_model(folder)(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, _consensus_logits(exp, ids), atol=1e-5, rtol=0)
    assert torch.equal(theirs, again)


def test_a_llama_classifier_has_no_head_bias_and_stock_peft_gives_its_logits(tiny_llama, tmp_path):
    """LLaMA's score layer has no bias: declora adds none (stock PEFT would drop it), and its rows are
    padded with config.json's pad_token_id, the id transformers looks past to find the last token."""
    exp = build_experiment(
        load_config(None, _overrides(tiny_llama, tmp_path, "model.target_modules=[q_proj,v_proj]"))
    )
    assert sorted(exp.fed.tensors(("head",))) == ["score.weight"]
    run(exp)
    folder = exp.run_dir / "adapters" / "consensus"
    assert not any("bias" in k for k in load_file(str(folder / "adapter_model.safetensors")))
    _check_stock_peft_gives_consensus_logits(exp)


# Decoder families whose attention and MLP differ from LLaMA's, each with the layers LoRA adapts in it:
# biased q/k/v (Qwen2), soft-capped logits (Gemma 2), a fused qkv_proj (Phi-3), a partial rotary and MLP
# targets (Phi), a fused query_key_value with a parallel residual (GPT-NeoX) and ALiBi positions (BLOOM).
DECODERS = {
    "qwen2": ("Qwen2", ["q_proj", "v_proj"], {"num_key_value_heads": 2}),
    "gemma2": ("Gemma2", ["q_proj", "v_proj"], {"num_key_value_heads": 2, "head_dim": 8}),
    "phi3": ("Phi3", ["qkv_proj"], {"num_key_value_heads": 2}),
    "phi": ("Phi", ["q_proj", "v_proj", "fc1", "fc2"], {}),
    "gpt_neox": ("GPTNeoX", ["query_key_value"], {}),
    "bloom": ("Bloom", ["query_key_value"], {"n_head": 4, "n_layer": 2}),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def tiny_decoder(request, byte_level_tokenizer, tmp_path_factory):
    """(model type, folder): a 2-layer decoder of one of DECODERS' families."""
    family, _, shape = DECODERS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, _save_decoder(folder, family, byte_level_tokenizer, **shape)


def _save_decoder(folder, family: str, tokenizer, **shape):
    """A causal LM of the transformers family ``family`` (hidden 32, 4 heads, random weights) with the
    byte-level tokenizer, saved as a local model folder."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        **{"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
        **{"num_attention_heads": 4, "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id},
        **shape,
    )
    torch.manual_seed(0)
    return _save_tiny(folder, getattr(transformers, f"{family}ForCausalLM")(config), tokenizer)


def test_decoders_of_other_families_classify_as_stock_peft_does(tiny_decoder, tmp_path):
    """A classifier on each family's last token, trained and exported: the folder's own loading lines give
    declora's consensus logits, padded or one row at a time."""
    model_type, folder = tiny_decoder
    targets = DECODERS[model_type][1]
    overrides = _overrides(folder, tmp_path, f"model.target_modules=[{','.join(targets)}]", "train.lr=0.02")
    exp = build_experiment(load_config(None, overrides))
    run(exp)
    ours = _check_stock_peft_gives_consensus_logits(exp)
    assert float(ours.std()) > 0.1  # rows are told apart: the comparison is not of constants


def test_target_modules_that_match_nothing_name_the_usual_choice_for_the_model(tiny_decoder, tmp_path):
    """The error names what PEFT adapts in this family by default, or the attention's query and value
    projections where PEFT has no default (Phi-3), and that choice runs (the test above); it is what
    model.target_modules=auto, the default, adapts."""
    model_type, folder = tiny_decoder
    usual = DECODERS[model_type][1]
    bert_names = _overrides(folder, tmp_path, "model.target_modules=[query,value]")
    with pytest.raises(
        ConfigError, match=re.escape(f"usual choice for this model: model.target_modules=[{','.join(usual)}]")
    ):
        build_experiment(load_config(None, bert_names))
    (tmp_path / "auto").mkdir()
    exp = build_experiment(load_config(None, _overrides(folder, tmp_path / "auto")))
    assert exp.cfg.model.target_modules == ("auto",) and exp.fed.targets == tuple(usual)
    assert sorted({name.split(".")[-1] for name in exp.fed.lora}) == sorted(usual)


def test_a_decoder_transformers_cannot_classify_is_pointed_to_label_words(byte_level_tokenizer, tmp_path):
    """Granite has a causal-LM class but no sequence-classification one: one line says to classify with
    its language-model head (task.kind=label_words), before any weight is read."""
    folder = _save_decoder(tmp_path / "granite", "Granite", byte_level_tokenizer)
    overrides = _overrides(folder, tmp_path, "model.target_modules=[q_proj,v_proj]")
    with pytest.raises(
        ConfigError,
        match=r"granite model, which transformers cannot load as a classifier .*task.kind=label_words",
    ):
        build_experiment(load_config(None, overrides))
    words = ["task.kind=label_words", "model.head=none", 'task.template="Review: {text}\\nSentiment:"']
    exp = build_experiment(
        load_config(None, [*overrides, *words, "task.label_words=[' negative',' positive']"])
    )
    assert isinstance(exp.task, LabelWords) and len(run(exp)) == 2  # what the line says runs


def test_a_model_with_no_causal_lm_class_is_refused_for_a_causal_task(distilbert_without_head, tmp_path):
    """A config.json without architectures passes the check that the model generates; transformers has
    no causal-LM class for DistilBERT: one line says so, not transformers' list of classes."""
    folder = tmp_path / "no-architectures"
    shutil.copytree(distilbert_without_head, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))
    overrides = _overrides(folder, tmp_path, "model.target_modules=[q_lin,v_lin]", "task.kind=label_words")
    with pytest.raises(
        ConfigError, match=r"^model.name=.* is a distilbert model, which transformers cannot "
    ):
        build_experiment(
            load_config(None, [*overrides, "model.head=none", "task.label_words=[' bad',' good']"])
        )


def test_a_config_its_model_class_refuses_is_named_with_its_folder(tiny_bert, tmp_path):
    """A hand-edited config.json (32 hidden units over 3 heads): one ConfigError naming the folder and
    transformers' reason, not a bare ValueError from inside transformers."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))
    with pytest.raises(
        ConfigError, match=r"^model folder .*edited: transformers cannot build the model its "
    ):
        build_experiment(load_config(None, _overrides(folder, tmp_path)))


def test_all_linear_adapts_every_linear_layer_but_the_heads_and_stock_peft_agrees(tiny_bert, tmp_path):
    """model.target_modules=all-linear (PEFT's shorthand, as a string): every linear layer of the encoder,
    the pooler included ([CLS] pooling reads it), none of the head, which trains whole; the export names
    the layers it resolved to, stock PEFT reproduces its logits, and it seeds another all-linear run."""
    overrides = _overrides(tiny_bert, tmp_path, "model.target_modules=all-linear", "train.lr=0.02")
    exp = build_experiment(load_config(None, overrides))
    assert exp.cfg.model.target_modules == ("all-linear",)
    adapted = {name.split(".")[-1] for name in exp.fed.lora}
    assert adapted == {"query", "key", "value", "dense"} and "bert.pooler.dense" in exp.fed.lora
    assert len(exp.fed.lora) == 2 * 6 + 1 and not any(name.startswith("classifier") for name in exp.fed.lora)
    run(exp)
    ours = _check_stock_peft_gives_consensus_logits(exp)
    assert float(ours.std()) > 0.01
    folder = exp.run_dir / "adapters" / "consensus"
    assert sorted(json.loads((folder / "adapter_config.json").read_text())["target_modules"]) == sorted(
        adapted
    )
    (tmp_path / "again").mkdir()
    seeded = _overrides(
        tiny_bert, tmp_path / "again", "model.target_modules=[all-linear]", f"model.init_adapter={folder}"
    )
    again = build_experiment(load_config(None, seeded))
    for name, layer in again.fed.lora.items():
        torch.testing.assert_close(layer.A[0], exp.fed.lora[name].A.detach().mean(0), atol=1e-6, rtol=0)
    with pytest.raises(
        ConfigError,
        match=r"targets \['dense', 'key', 'query', 'value'\], the run model.target_modules=\['query', 'v",
    ):
        build_experiment(load_config(None, [*seeded, "model.target_modules=[query,value]"]))
    with pytest.raises(ConfigError, match=r"all-linear already names every linear layer; give it alone"):
        load_config(None, [*overrides, "model.target_modules=[all-linear,query]"])


def test_a_regular_expression_adapts_the_layers_whose_full_names_it_matches_and_stock_peft_agrees(
    tiny_bert, tmp_path
):
    """A string for model.target_modules is PEFT's regular expression on the full names: here layer 1's
    query and value alone; the export lists those full names, stock PEFT reproduces the logits, and the
    adapter seeds another run with the same expression."""
    expression = r"bert\.encoder\.layer\.1\..*\.(query|value)"
    overrides = _overrides(tiny_bert, tmp_path, f"model.target_modules={expression}", "train.lr=0.02")
    exp = build_experiment(load_config(None, overrides))
    assert exp.cfg.model.target_modules == expression
    adapted = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert sorted(exp.fed.lora) == adapted
    run(exp)
    assert float(_check_stock_peft_gives_consensus_logits(exp).std()) > 1e-3  # texts told apart
    folder = exp.run_dir / "adapters" / "consensus"
    assert sorted(json.loads((folder / "adapter_config.json").read_text())["target_modules"]) == adapted
    (tmp_path / "again").mkdir()
    seeded = _overrides(
        tiny_bert, tmp_path / "again", f"model.target_modules={expression}", f"model.init_adapter={folder}"
    )
    again = build_experiment(load_config(None, seeded))
    for name, layer in again.fed.lora.items():
        torch.testing.assert_close(layer.A[0], exp.fed.lora[name].A.detach().mean(0), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"model.target_modules='\(query' is not a regular expression"):
        load_config(None, [*overrides, "model.target_modules=(query"])
    with pytest.raises(
        ConfigError,
        match=r"matches no linear layer of .*; their names run from 'bert.encoder.layer.0.attention.self.q",
    ):
        build_experiment(load_config(None, [*overrides, r"model.target_modules=.*\.layer\.7\..*"]))


def test_all_linear_leaves_a_causal_lms_output_layer_alone(tiny_llama, tmp_path):
    """all-linear on a causal LM: the attention and MLP projections, not lm_head (as PEFT's shorthand)."""
    words = ["task.kind=label_words", "model.head=none", "task.label_words=[' negative',' positive']"]
    exp = build_experiment(
        load_config(None, _overrides(tiny_llama, tmp_path, "model.target_modules=all-linear", *words))
    )
    adapted = {name.split(".")[-1] for name in exp.fed.lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_padding_uses_the_configs_pad_id_when_the_tokenizer_has_none(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = config["bos_token_id"]  # another id than the old pad (eos)
    (folder / "config.json").write_text(json.dumps(config))
    exp = build_experiment(
        load_config(None, _overrides(folder, tmp_path, "model.target_modules=[q_proj,v_proj]"))
    )
    assert exp.pad_id == config["bos_token_id"] and exp.task.tokenizer.pad_token_id is None
    ids = [exp.task.tokenizer(t)["input_ids"] for t in _texts(10)]
    torch.testing.assert_close(
        _consensus_logits(exp, ids), torch.cat([_consensus_logits(exp, [x]) for x in ids]), atol=1e-5, rtol=0
    )


def test_a_llama_classifier_without_a_pad_id_is_refused_before_any_work(tiny_llama, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    cfg = load_config(None, _overrides(folder, tmp_path, "model.target_modules=[q_proj,v_proj]"))
    with pytest.raises(
        ConfigError, match=r'set "pad_token_id" in its config.json \(e.g. 1, the tokenizer.s pad id'
    ):
        build_experiment(cfg)
    assert not (tmp_path / "run").exists()


def test_weights_the_checkpoint_lacks_outside_the_head_are_refused(minilm_tokenizer, tmp_path):
    """A BERT saved without its pooler: with the [CLS] pooler read, that layer would start random and stay
    frozen; with mean pooling it is not read, and the run goes on."""
    from transformers import BertConfig, BertModel

    config = _bert_sized(BertConfig, minilm_tokenizer)
    folder = _save_tiny(tmp_path / "no-pooler", BertModel(config, add_pooling_layer=False), minilm_tokenizer)
    cfg = load_config(None, _overrides(folder, tmp_path, "model.pooling=cls"))
    with pytest.raises(
        ValueError, match=r"holds no weights for \['bert.pooler.dense.*stay frozen.*pooling=mean"
    ):
        build_experiment(cfg)
    assert (
        build_experiment(load_config(None, _overrides(folder, tmp_path, "model.pooling=mean"))).fed.pooling
        == "mean"
    )


def test_a_folder_without_tokenizer_files_is_refused(tiny_bert, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"knows only the special tokens.*lacks its tokenizer files"):
        build_experiment(load_config(None, _overrides(folder, tmp_path)))


def test_a_misspelt_target_module_beside_a_right_one_is_refused(tiny_bert, tmp_path):
    cfg = load_config(None, _overrides(tiny_bert, tmp_path, "model.target_modules=[query,valu]"))
    with pytest.raises(ConfigError, match=r"names \['valu'\], which match no linear layer.*'value'"):
        build_experiment(cfg)


def test_gpt2_conv1d_layers_are_named_as_what_lora_cannot_adapt(minilm_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=minilm_tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=64
    )
    folder = _save_tiny(tmp_path / "gpt2", GPT2LMHeadModel(config), minilm_tokenizer)
    with pytest.raises(ConfigError, match=r"not nn.Linear: \['c_attn \(Conv1D\)'\].*Conv1D is not supported"):
        build_experiment(load_config(None, _overrides(folder, tmp_path, "model.target_modules=[c_attn]")))


def test_language_modelling_reads_a_table_without_labels(tiny_llama, tmp_path):
    table = tmp_path / "notes.csv"
    table.write_text("text\n" + "".join(f'"{t}"\n' for t in _texts(40)))
    overrides = _overrides(tiny_llama, tmp_path, "model.target_modules=[q_proj,v_proj]", "model.head=none")
    overrides += [f"data.dataset={table}", "task.kind=causal_lm", "eval.headline=ppl_avg_factors"]
    exp = build_experiment(load_config(None, [*overrides, "eval.every=1"]))
    # Every row of the table is a text once, in training or held out: the header is no row, none is lost
    decode = exp.task.tokenizer.decode
    trained = [decode(exp.trainer.token_ids[i], skip_special_tokens=True) for p in exp.parts for i in p]
    held_out = [decode(x, skip_special_tokens=True) for x in exp.consensus_eval.token_ids]
    assert sorted(trained + held_out) == sorted(_texts(40)) and len(set(_texts(40))) == 40
    assert len(held_out) == 8  # data.test_fraction's 0.2 of the 40 rows
    ppl = [r["ppl_avg_factors"] for r in run(exp) if "ppl_avg_factors" in r]
    vocab = len(exp.task.tokenizer)
    assert len(ppl) == 2 and ppl[1] < ppl[0] < vocab  # it learns, from below a uniform guess over the vocab


def test_a_label_column_that_is_the_text_column_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.text_column and data.label_column are both 'text'"):
        load_config(None, ["data.dataset=x.csv", "data.label_column=text"])


def test_a_label_no_node_trains_on_is_warned_about(tiny_bert, tmp_path, caplog):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text(
        "".join(json.dumps({"text": t, "label": ["a", "b"][i % 2]}) + "\n" for i, t in enumerate(_texts(24)))
    )
    test.write_text(
        "".join(json.dumps({"text": t, "label": "abc"[i % 3]}) + "\n" for i, t in enumerate(_texts(9)))
    )
    # A test label the training rows lack is refused (data.encode_rows); a ClassLabel may name one.
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    held = [json.loads(x) for x in test.read_text().splitlines()]
    DatasetDict(
        train=Dataset.from_list([{**r, "label": "abc".index(r["label"])} for r in rows], features=features),
        test=Dataset.from_list([{**r, "label": "abc".index(r["label"])} for r in held], features=features),
    ).save_to_disk(tmp_path / "saved")
    overrides = _overrides(tiny_bert, tmp_path, f"data.dataset={tmp_path / 'saved'}")
    build_experiment(load_config(None, overrides))
    assert "labels ['c'] have no training rows on any node" in caplog.text


def test_an_encoder_decoder_is_refused_for_every_task(minilm_tokenizer, tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        d_model=32,
        **{
            f"{part}_{k}": v
            for part in ("encoder", "decoder")
            for k, v in (("layers", 1), ("attention_heads", 2), ("ffn_dim", 64))
        },
    )
    folder = _save_tiny(tmp_path / "bart", BartForConditionalGeneration(config), minilm_tokenizer)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(_texts(20)))
    causal = [
        "model.head=none",
        "task.kind=causal_lm",
        f"data.dataset={text}",
        "eval.headline=ppl_avg_factors",
    ]
    for extra in ([], causal):
        cfg = load_config(None, _overrides(folder, tmp_path, "model.target_modules=[q_proj,v_proj]", *extra))
        with pytest.raises(
            ConfigError, match=r"is an encoder-decoder model \(bart\), which declora does not"
        ):
            build_experiment(cfg)


def test_a_classification_head_of_another_name_is_refused(minilm_tokenizer, tmp_path):
    """XLNet's head (sequence_summary, logits_proj) is none that declora trains: it would stay random."""
    from transformers import XLNetConfig, XLNetModel

    config = XLNetConfig(vocab_size=minilm_tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2, d_inner=64)
    folder = _save_tiny(tmp_path / "xlnet", XLNetModel(config), minilm_tokenizer)
    cfg = load_config(None, _overrides(folder, tmp_path, "model.target_modules=[q,v]"))
    with pytest.raises(ConfigError, match=r"has no classification head declora trains.*'logits_proj'"):
        build_experiment(cfg)


def test_a_modernbert_without_its_prediction_head_runs_with_mean_pooling(minilm_tokenizer, tmp_path):
    """ModernBERT's classifier path applies its prediction head (``head``) before ``classifier``; a base
    saved without it is refused with the [CLS] path, and mean pooling, which never reads it, runs."""
    from transformers import ModernBertConfig, ModernBertModel

    ids = {f"{k}_token_id": getattr(minilm_tokenizer, f"{k}_token_id") for k in ("pad", "cls", "sep")}
    ids.update(bos_token_id=ids["cls_token_id"], eos_token_id=ids["sep_token_id"])
    config = _bert_sized(ModernBertConfig, minilm_tokenizer, **ids)
    folder = _save_tiny(tmp_path / "modernbert", ModernBertModel(config), minilm_tokenizer)
    targets = "model.target_modules=[Wqkv,Wo]"
    with pytest.raises(ValueError, match=r"holds no weights for \['head.*or model.pooling=mean"):
        build_experiment(load_config(None, _overrides(folder, tmp_path, targets)))
    exp = build_experiment(load_config(None, _overrides(folder, tmp_path, targets, "model.pooling=mean")))
    assert exp.fed.pooling == "mean" and sorted(exp.fed.heads) == ["classifier"]


def test_a_pad_id_the_tokenizer_does_not_pad_with_is_refused(tiny_llama, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = 0  # the tokenizer's <s>; it pads with </s> (1)
    (folder / "config.json").write_text(json.dumps(config))
    cfg = load_config(None, _overrides(folder, tmp_path, "model.target_modules=[q_proj,v_proj]"))
    with pytest.raises(ConfigError, match=r"config.json's pad_token_id is 0 but its tokenizer pads with 1"):
        build_experiment(cfg)


def test_a_causal_lm_missing_weights_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    del state["model.norm.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(_texts(20)))
    overrides = _overrides(tiny_llama, tmp_path, "model.target_modules=[q_proj,v_proj]", "model.head=none")
    overrides += [f"model.name={folder}", f"data.dataset={text}", "task.kind=causal_lm"]
    with pytest.raises(ValueError, match=r"holds no weights for \['model.norm.weight'\]"):
        build_experiment(load_config(None, [*overrides, "eval.headline=ppl_avg_factors"]))


def _sentence_transformers(folder):
    """Mark a model folder as sentence-transformers' own: its pooling config says mean tokens."""
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def _recipe_logits(folder, base, texts):
    """The logits of the exported folder's README recipe (stock transformers + PEFT), run as written."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    scope = {"BASE": str(base), "FOLDER": str(folder), "texts": texts}
    exec(code, scope)
    return scope["logits"], scope["batch"]


def test_a_roberta_sentence_model_reads_the_mean_and_stock_peft_reproduces_it(minilm_tokenizer, tmp_path):
    """all-mpnet-base-v2 / all-distilroberta-v1 form: the head reads the first position of what it is
    handed, so it is handed the mean; its dense + out_proj train, and the README recipe gives our logits."""
    from transformers import RobertaConfig, RobertaModel

    config = _bert_sized(RobertaConfig, minilm_tokenizer, pad_token_id=minilm_tokenizer.pad_token_id)
    torch.manual_seed(0)
    base = _sentence_transformers(_save_tiny(tmp_path / "roberta-st", RobertaModel(config), minilm_tokenizer))
    exp = build_experiment(
        load_config(None, _overrides(base, tmp_path, "model.target_modules=[query,value]"))
    )
    assert (exp.fed.pooling, exp.fed.head_input) == ("mean", "sequence")
    assert sorted(exp.fed.heads) == ["classifier.dense", "classifier.out_proj"]
    start = {name: head.weight.detach().clone() for name, head in exp.fed.heads.items()}
    run(exp)
    assert all(not torch.equal(head.weight.detach(), start[name]) for name, head in exp.fed.heads.items())
    folder = exp.run_dir / "adapters" / "consensus"
    assert json.loads((folder / "declora_adapter.json").read_text())["head_input"] == "sequence"
    texts = _texts(12)
    theirs, batch = _recipe_logits(folder, base, texts)
    ids = [
        row[: int(n)]
        for row, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1), strict=True)
    ]
    ours = _consensus_logits(exp, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    with torch.no_grad():  # and the mean is what it reads: the stock forward (first token) differs
        stock = _readme_model_stock(folder, base)(**batch).logits
    assert (stock - ours).abs().max() > 1e-3


def _readme_model_stock(folder, base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=2, ignore_mismatched_sizes=True
    )
    return PeftModel.from_pretrained(model, str(folder)).eval()


def test_distilbert_with_mean_pooling_trains_and_gossips_only_the_head_it_reads(
    distilbert_without_head, tmp_path
):
    """DistilBERT's pre_classifier is applied to the first token only: under mean pooling it is not
    trained or sent, yet the export carries the base's copy, which stock PEFT needs to load it, and the
    export seeds a run again."""
    from declora.model import build_federation
    from declora.peft_io import import_peft

    targets = "model.target_modules=[q_lin,v_lin]"
    cfg = load_config(None, _overrides(distilbert_without_head, tmp_path, targets, "model.pooling=mean"))
    exp = build_experiment(cfg)
    assert sorted(exp.fed.heads) == ["classifier"]
    assert not any("pre_classifier" in name for name in exp.fed.tensors())  # neither trained nor gossiped
    frozen = exp.fed.model.pre_classifier.weight.detach().clone()
    run(exp)
    folder = exp.run_dir / "adapters" / "consensus"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.pre_classifier.weight"], frozen)
    texts = _texts(12)
    theirs, batch = _recipe_logits(folder, distilbert_without_head, texts)
    ids = [
        row[: int(n)]
        for row, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1), strict=True)
    ]
    torch.testing.assert_close(theirs, _consensus_logits(exp, ids), atol=1e-5, rtol=0)
    seeded = build_federation(cfg.model, n=1, num_labels=2)
    import_peft(seeded, folder)  # the unread pre_classifier in the file is no reason to refuse
    with torch.no_grad(), seeded.route(torch.zeros(len(ids), dtype=torch.long)):
        torch.testing.assert_close(
            seeded(batch["input_ids"], batch["attention_mask"]), theirs, atol=1e-5, rtol=0
        )


def test_auto_pooling_says_when_a_head_cannot_follow_the_folders_mean(minilm_tokenizer, tmp_path, caplog):
    from transformers import FunnelConfig, FunnelModel

    config = FunnelConfig(
        vocab_size=minilm_tokenizer.vocab_size, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32
    )
    base = _sentence_transformers(_save_tiny(tmp_path / "funnel-st", FunnelModel(config), minilm_tokenizer))
    exp = build_experiment(
        load_config(None, _overrides(base, tmp_path, "model.target_modules=[q_head,v_head]"))
    )
    assert exp.fed.pooling == "cls"
    assert "pools the mean of the tokens, but it has a FunnelClassificationHead head" in caplog.text


def _as_hub_cache(root, repo_id: str, folder):
    """``folder`` laid out as the Hugging Face cache keeps a downloaded model: refs/main names the
    commit whose snapshot holds the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_model_in_the_hugging_face_cache_is_found_offline_and_named_in_the_card(
    tiny_bert, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    from declora.adapter_card import CARD_FILE
    from declora.assets import AssetNotFoundError, model_path
    from declora.inputs import fingerprints

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub is never asked
    snapshot = _as_hub_cache(tmp_path / "hub", "someone/tiny-bert", tiny_bert)
    assert model_path("someone/tiny-bert") == snapshot
    with pytest.raises(
        AssetNotFoundError, match=r"never downloads: fetch it once with `hf download someone/other`"
    ):
        model_path("someone/other")
    cfg = load_config(None, _overrides("someone/tiny-bert", tmp_path, "rounds=1"))
    assert fingerprints(cfg)["model.name"]["path"] == str(snapshot.resolve())  # a resume sees a new snapshot
    run(build_experiment(cfg))
    card = tmp_path / "run" / "adapters" / "consensus"
    meta = json.loads((card / CARD_FILE).read_text())
    assert meta["base_model_public"] == "someone/tiny-bert" and meta["base_model"] == str(snapshot.resolve())
    assert "Base model: `someone/tiny-bert`" in (card / "README.md").read_text()
    # the exported adapter, as a hub repository in the cache, seeds another run by its id
    _as_hub_cache(tmp_path / "hub", "someone/tiny-adapter", card)
    seeded_run = [f"run_dir={tmp_path / 'seeded'}", "model.init_adapter=someone/tiny-adapter"]
    seeded = build_experiment(load_config(None, [*_overrides("someone/tiny-bert", tmp_path), *seeded_run]))
    weights = load_file(str(card / "adapter_model.safetensors"))
    a = next(k for k in weights if k.endswith("lora_A.weight"))
    ours = seeded.fed.tensors()[a.removeprefix("base_model.model.").replace(".weight", "")]
    assert all(torch.equal(row, weights[a]) for row in ours)  # every node starts from the adapter
    with pytest.raises(
        ConfigError, match=r"nor an adapter in the Hugging Face cache .*`hf download someone/none`"
    ):
        build_experiment(
            load_config(None, [*_overrides("someone/tiny-bert", tmp_path), "model.init_adapter=someone/none"])
        )
