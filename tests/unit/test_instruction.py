"""task.kind=instruction on the tiny LLaMA: rows are prompt + response, the loss and the perplexity read
the response tokens only, chat templates format the prompt, messages and prompt/response tables load."""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import special_adding_tokenizer

from declora.config import DataConfig, load_config
from declora.data import load_dataset
from declora.experiment import EvalSet
from declora.model import averaged_factors
from declora.tasks import Instruction
from declora.train import pad
from declora.user_data import read_instructions

pytestmark = pytest.mark.unit
PAIRS = [("What is 2 + 3?", "2 + 3 = 5."), ("Name a colour.", "Blue."), ("Say hi", "hi there, friend")]


def _task(tiny_llama, max_length=48):
    from transformers import AutoTokenizer

    return Instruction(AutoTokenizer.from_pretrained(str(tiny_llama)), max_length)


def _turns(prompt: str) -> str:
    return json.dumps([{"role": "user", "content": prompt}])


def test_rows_are_prompt_then_response_and_eos(tiny_llama):
    task = _task(tiny_llama)
    rows, lengths = task.encode_pairs([_turns(p) for p, _ in PAIRS], [r for _, r in PAIRS])
    tok = task.tokenizer
    for row, n, (prompt, response) in zip(rows, lengths, PAIRS, strict=True):
        assert row[-1] == tok.eos_token_id and tok.decode(row[-n:-1]) == response
        assert tok.decode(row[: len(row) - n], skip_special_tokens=True) == f"user: {prompt}\nassistant: "


def test_loss_and_perplexity_read_the_response_tokens_only(tiny_llama):
    task = _task(tiny_llama)
    rows, lengths = task.encode_pairs([_turns(p) for p, _ in PAIRS], [r for _, r in PAIRS])
    input_ids, mask = pad(rows, pad_id=0)
    labels = torch.as_tensor(lengths)
    logits = torch.randn(*input_ids.shape, 50, generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.clamp(max=49)
    keep = task.positions(input_ids, mask, labels, train=True)
    loss = task.row_loss(logits[:, keep], input_ids, mask, labels, keep)
    for i, n in enumerate(lengths.tolist()):  # by hand: position p predicts token p + 1
        end = int(mask[i].sum())
        hand = F.cross_entropy(logits[i, end - n - 1 : end - 1], input_ids[i, end - n : end])
        torch.testing.assert_close(loss[i], hand)
    prompt_only = logits.clone()
    prompt_only[:, 0] += 5.0  # position 0 predicts a prompt token of every row: no effect
    torch.testing.assert_close(
        task.row_loss(prompt_only, input_ids, mask, labels), task.row_loss(logits, input_ids, mask, labels)
    )
    stats = task.row_stats(logits, input_ids, mask, labels)
    assert stats[:, 1].tolist() == lengths.tolist()
    hand_sums = loss.detach() * lengths  # each row's summed NLL over its response tokens (checked above)
    torch.testing.assert_close(stats[:, 0], hand_sums.to(stats.dtype), rtol=1e-5, atol=1e-5)
    assert math.isclose(
        float(task.finalize(stats.sum(0))), math.exp(float(hand_sums.sum() / lengths.sum())), rel_tol=1e-5
    )


def test_chat_template_formats_the_prompt(tiny_llama):
    task = _task(tiny_llama)
    task.tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    turns = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}])
    (row,), (n,) = task.encode_pairs([turns], ["hi"])
    text = task.tokenizer.decode(row)
    assert text.startswith("<s>system\nBe brief.</s>\n<s>user\nSay hi</s>\n<s>assistant\n")
    # the template's end of turn is learnt, once; what the template adds after it (a newline) is no target,
    # since greedy generation stops at EOS
    assert task.tokenizer.decode(row[-n:]) == "hi</s>"


def test_prompt_is_cut_from_its_start_when_too_long(tiny_llama):
    task = _task(tiny_llama, max_length=12)
    (row,), (n,) = task.encode_pairs([_turns("word " * 40)], ["ok"])
    assert len(row) == 12 and task.tokenizer.decode(row[-n:-1]) == "ok"
    assert task.cut == 1
    roomy = _task(tiny_llama, max_length=256)
    roomy.encode_pairs([_turns("word " * 40)], ["ok"])
    assert roomy.cut == 0


def test_messages_and_prompt_response_tables(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]})
            + "\n"
            for p, r in PAIRS * 4
        )
    )
    train, test = load_dataset(DataConfig(dataset=str(chats), test_fraction=0.25), 0, instruction=True)
    assert len(train) == 9 and len(test) == 3
    assert {
        (json.loads(t)[0]["content"], r) for t, r in zip(train.texts, train.responses, strict=True)
    } <= set(PAIRS)
    table = tmp_path / "qa.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"q": p, "a": r} for p, r in PAIRS]), table)
    held = tmp_path / "qa_test.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": p, "a": r} for p, r in PAIRS[:2]]), held)
    cfg = DataConfig(dataset=str(table), test_file=str(held), prompt_column="q", response_column="a")
    train, test = load_dataset(cfg, 0, instruction=True)
    assert test.responses == [r for _, r in PAIRS[:2]]
    assert train.responses == [r for _, r in PAIRS] and json.loads(train.texts[1]) == [
        {"role": "user", "content": "Name a colour."}
    ]
    both = tmp_path / "both.jsonl"  # named prompt/response columns win over a messages column
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    both.write_text("".join(json.dumps({"q": p, "a": r, "messages": chat}) + "\n" for p, r in PAIRS))
    cfg = DataConfig(dataset=str(both), test_file=str(held), prompt_column="q", response_column="a")
    train, _ = load_dataset(cfg, 0, instruction=True)
    assert train.responses == [r for _, r in PAIRS]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="must end with an assistant message"):
        load_dataset(DataConfig(dataset=str(bad), test_file=str(held)), 0, instruction=True)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("chat", "says"),
    [
        (
            [USER, {"role": "assistant", "content": None}],
            r"message 1 needs a string 'role' and a string 'content'",
        ),
        ([USER, {"role": "assistant"}], r"message 1 needs a string 'role' and a string 'content'"),
        ([{"content": "hi"}, {"role": "assistant", "content": "x"}], r"message 0 needs a string 'role'"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], r"message 0 needs a string 'role'"),
        ([{"role": "assistant", "content": "x"}], r"has no prompt turn before the assistant's answer"),
        ("hello", r"must be a non-empty list of \{role, content\} messages, not 'hello'"),
        ([], r"must be a non-empty list of \{role, content\} messages, not \[\]"),
    ],
    ids=[
        "null_answer",
        "no_content",
        "no_role",
        "prompt_without_content",
        "no_prompt",
        "a_string",
        "empty",
    ],
)
def test_a_malformed_conversation_is_named_by_row_whatever_the_tokenizer(tmp_path, chat, says):
    """Checked when read, before any chat template could render a missing field as empty text (or a
    null answer as the text 'None')."""
    good = {"messages": [USER, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": chat}) + "\n")
    with pytest.raises(ValueError, match=rf"^{data}:2: 'messages'.*{says}"):  # the file's line, as elsewhere
        read_instructions(str(data), "train", DataConfig())


def _instruction_run(tiny_llama, data, *extra: str) -> list[str]:
    """Overrides of a 2-node instruction run of the tiny LLaMA on ``data``."""
    overrides = [f"model.name={tiny_llama}", "model.target_modules=[q_proj,v_proj]", "model.head=none"]
    overrides += ["model.max_length=32", "task.kind=instruction", "eval.headline=ppl_avg_factors"]
    return [*overrides, f"data.dataset={data}", "nodes=2", "export=none", "threads=1", *extra]


def test_a_run_learns_the_responses(tiny_llama, tmp_path):
    from declora.engine import run
    from declora.experiment import build_experiment

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * 12))
    overrides = _instruction_run(tiny_llama, data, "model.rank=4", "rounds=4", "train.batch_size=4")
    overrides += ["train.lr=0.1", "train.local_steps=6", "eval.every=1", "eval.node_examples=6"]
    records = run(build_experiment(load_config(None, [*overrides, f"run_dir={tmp_path / 'r'}"])))
    ppl = [r["ppl_avg_factors"] for r in records]
    assert all(math.isfinite(p) and p > 1 for p in ppl)
    assert all(b < a for a, b in zip(ppl, ppl[1:], strict=False)) and ppl[-1] < 0.9 * ppl[0]  # 332 -> 288


def test_greedy_matches_on_constructed_logits():
    from declora.tasks import IGNORE, greedy_matches

    targets = torch.tensor([[IGNORE, IGNORE, 3, 1], [IGNORE, IGNORE, 3, 1], [IGNORE, 2, 0, 4]])
    logits = torch.zeros(3, 4, 5)
    logits[0, 1, 3] = logits[0, 2, 1] = 1.0  # row 0: the argmax after each position is the next target
    logits[1, 1, 3] = logits[1, 2, 2] = 1.0  # row 1: the last token differs
    logits[2, 0, 2] = logits[2, 1, 0] = logits[2, 2, 4] = 1.0
    logits[:, 3] = 9.0 * torch.arange(5)  # the last position predicts nothing: ignored
    assert greedy_matches(logits, targets).tolist() == [True, False, True]
    keep = torch.tensor([0, 1, 2])
    assert greedy_matches(logits[:, keep], targets, keep).tolist() == [True, False, True]


def test_exact_match_is_greedy_decoding_of_the_tiny_llama(tiny_llama):
    """The teacher-forced exact match equals decoding greedily from the prompt and comparing tokens: a
    reference made of the model's own greedy tokens matches, the same with one token changed does not."""
    from declora.config import ModelConfig
    from declora.model import build_federation

    task = _task(tiny_llama)
    cfg = ModelConfig(name=str(tiny_llama), rank=2, target_modules=("q_proj", "v_proj"))
    fed = build_federation(cfg, 1, 1, True)
    fed.set_training(False)
    (prompt,), _ = task.encode_pairs([_turns("Say hi")], [""])  # prompt + EOS
    ids = list(prompt[:-1])
    with torch.no_grad(), fed.route(torch.zeros(1, dtype=torch.long)):
        for _ in range(4):  # greedy decoding, one token at a time
            x, m = pad([ids], 0)
            ids.append(int(fed(x, m)[0, -1].argmax()))
        greedy = ids[len(prompt) - 1 :]
        wrong = [*greedy[:-1], greedy[-1] ^ 1]  # another token of the vocabulary
    rows = [prompt[:-1] + greedy, prompt[:-1] + wrong]
    x, m = pad(rows, 0)
    with torch.no_grad(), fed.route(torch.zeros(2, dtype=torch.long)):
        stats = task.row_stats(fed(x, m), x, m, torch.tensor([4, 4]))
    assert stats[:, 2].tolist() == [1.0, 0.0] and stats[:, 1].tolist() == [4.0, 4.0]
    assert float(task.extras(stats.sum(0))["em"]) == 0.5


def _scored_by_hand(exp, data, node: int, stacked=None) -> tuple[float, float]:
    """The response perplexity and exact match of the rows ``data`` scored by node ``node`` (or, given
    ``stacked``, by that one model in place of every node's own): one padded forward pass of all the rows,
    read through the task's row_stats, extras and finalize."""
    input_ids, mask = pad(data.token_ids, exp.pad_id)
    labels = torch.as_tensor(data.labels)
    keep = exp.task.positions(input_ids, mask, labels, train=False)
    exp.fed.set_training(False)
    model = exp.fed.override(stacked) if stacked is not None else nullcontext()
    with torch.no_grad(), model, exp.fed.route(torch.full((len(data.labels),), node, dtype=torch.long)):
        logits = exp.fed(input_ids, mask, keep)
    totals = exp.task.row_stats(logits, input_ids, mask, labels, keep).sum(0)
    return float(exp.task.finalize(totals)), float(exp.task.extras(totals)["em"])


def _consensus(exp) -> dict[str, torch.Tensor]:
    """The averaged factors: every tensor's mean over the nodes, one model."""
    return averaged_factors({k: v.detach() for k, v in exp.fed.tensors().items()})


def _hand_scores(exp) -> dict[str, float]:
    """ppl_* and em_* of the node mean (each node on node_eval, its own rows) and of the averaged factors
    (one model, the mean of the nodes' tensors, on consensus_eval), recomputed outside declora.evaluate."""
    ppl, em = _scored_by_hand(exp, exp.consensus_eval, 0, _consensus(exp))
    nodes = torch.tensor([_scored_by_hand(exp, exp.node_eval, i) for i in range(exp.n)], dtype=torch.float64)
    ppl_nodes, em_nodes = nodes.mean(0).tolist()
    return {
        "ppl_avg_factors": ppl,
        "em_avg_factors": em,
        "ppl_node_mean": ppl_nodes,
        "em_node_mean": em_nodes,
    }


def _assert_scores(reported: dict, hand: dict[str, float]) -> None:
    # the same sums, padded and batched otherwise than the run's micro-batches: equal here, and equal to
    # float noise wherever the batching changes the last bits
    for key, want in hand.items():
        assert math.isclose(reported[key], want, rel_tol=1e-6, abs_tol=1e-6), (key, reported[key], want)


def _greedy_rows(exp, consensus, tokens: int = 3) -> EvalSet:
    """A held-out prompt followed by the consensus model's own greedy tokens (exact match 1 under that
    model), and the same row with its last token changed (exact match 0); each row's label is its
    response length, as the task's rows have."""
    first = exp.consensus_eval
    ids = list(first.token_ids[0][: len(first.token_ids[0]) - int(first.labels[0])])  # its prompt alone
    exp.fed.set_training(False)
    with torch.no_grad(), exp.fed.override(consensus), exp.fed.route(torch.zeros(1, dtype=torch.long)):
        for _ in range(tokens):
            x, m = pad([ids], exp.pad_id)
            ids.append(int(exp.fed(x, m)[0, -1].argmax()))
    wrong = [*ids[:-1], ids[-1] ^ 1]
    return EvalSet([ids, wrong], np.array([tokens, tokens]))


def test_a_run_reports_exact_match_beside_perplexity(tiny_llama, tmp_path):
    """Every evaluated model gets an em_* key beside its ppl_* key (node mean, both consensus models);
    the untrained model does not answer "ok" (EM 0.0). The node mean and the averaged factors' scores
    equal a forward pass made here: each node on its own rows, and the mean of the nodes' tensors (the
    lazy ring keeps the two nodes apart, so the consensus is no node's model). The tiny LLaMA's logits
    are too flat to learn the answer exactly in a few steps, so the run's EM stays 0; a nonzero EM is
    checked after it, on rows made of the consensus model's own greedy tokens."""
    from declora.engine import run
    from declora.evaluate import evaluate
    from declora.experiment import build_experiment

    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p, _ in PAIRS * 8))
    overrides = [f"model.name={tiny_llama}", "model.target_modules=[q_proj,v_proj]", "model.head=none"]
    overrides += ["model.rank=4", "model.max_length=32", "task.kind=instruction"]
    overrides += [f"data.dataset={data}", "nodes=2", "rounds=2", "train.batch_size=4", "train.lr=0.1"]
    overrides += ["eval.headline=ppl_avg_factors", "train.local_steps=2", "eval.node_examples=4"]
    overrides += ["topology.lazy=true", "export=none", "threads=1"]
    exp = build_experiment(load_config(None, [*overrides, f"run_dir={tmp_path / 'r'}"]))
    before = evaluate(exp)
    assert before["em_avg_factors"] == before["em_avg_product"] == before["em_node_mean"] == 0.0
    last = [r for r in run(exp) if "ppl_avg_factors" in r][-1]
    for mode in ("node_mean", "avg_factors", "avg_product"):
        assert 0.0 <= last[f"em_{mode}"] <= 1.0 and math.isfinite(last[f"ppl_{mode}"])
    assert last["ppl_avg_factors"] != last["ppl_avg_product"]  # the nodes differ: two consensus models
    _assert_scores(last, _hand_scores(exp))
    exp.consensus_eval = exp.node_eval = _greedy_rows(exp, _consensus(exp))
    hand = _hand_scores(exp)
    assert hand["em_avg_factors"] == 0.5  # the greedy row matches, the changed one does not
    _assert_scores(evaluate(exp), hand)


def test_exact_match_can_be_the_headline_of_instruction_runs_only():
    from declora.config import ConfigError

    cfg = load_config("configs/smollm2_instructions.yaml", ["eval.headline=em_avg_factors"])
    assert cfg.eval.headline == "em_avg_factors"
    with pytest.raises(ConfigError, match="eval.headline='em_avg_factors' is not measured for task.kind=seq"):
        load_config(None, ["eval.headline=em_avg_factors"])


def _training_texts(exp, node: int) -> list[str]:
    """Node ``node``'s training rows as text: the token ids the trainer reads, at the node's indices."""
    ids = exp.trainer.token_ids
    return [exp.task.tokenizer.decode(ids[k], skip_special_tokens=True) for k in exp.parts[node]]


def test_a_run_trains_each_node_on_its_own_instruction_file(tiny_llama, tmp_path):
    """Node i trains on c{i}.jsonl's pair, prompt then response, and on nothing else (rows of up to 64
    tokens: none is cut)."""
    from declora.engine import run
    from declora.experiment import build_experiment

    folder = tmp_path / "clients"
    folder.mkdir()
    for i, (prompt, response) in enumerate(PAIRS[:2]):
        (folder / f"c{i}.jsonl").write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    overrides = [f"model.name={tiny_llama}", "model.target_modules=[q_proj,v_proj]", "model.head=none"]
    overrides += ["model.rank=2", "model.max_length=64", "task.kind=instruction", "export=none"]
    overrides += [f"data.node_files={folder}", f"data.test_file={test}", "nodes=2", "rounds=1"]
    overrides += ["eval.headline=ppl_avg_factors", "train.batch_size=1", "threads=1"]
    exp = build_experiment(load_config(None, [*overrides, f"run_dir={tmp_path / 'r'}"]))
    assert [len(p) for p in exp.parts] == [1, 1] and len(exp.consensus_eval.labels) == 3
    for node, (prompt, response) in enumerate(PAIRS[:2]):
        assert _training_texts(exp, node) == [f"user: {prompt}\nassistant: {response}"]
    last = [r for r in run(exp) if "ppl_avg_factors" in r][-1]
    assert math.isfinite(last["ppl_avg_factors"]) and 0.0 <= last["em_avg_factors"] <= 1.0


@pytest.mark.parametrize("layout", ["messages", "prompt_response"])
def test_empty_responses_are_warned_about_in_either_layout(tiny_llama, tmp_path, caplog, layout):
    from declora.experiment import build_experiment

    chats = tmp_path / "chats.jsonl"
    rows = [(p, r if i % 2 else "") for i, (p, r) in enumerate(PAIRS * 4)]  # every other answer empty
    if layout == "messages":
        chat = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in rows
        ]
    else:
        chat = [{"prompt": p, "response": r} for p, r in rows]
    chats.write_text("".join(json.dumps(row) + "\n" for row in chat))
    overrides = _instruction_run(tiny_llama, chats, "model.rank=2", "partition.kind=iid")
    with caplog.at_level("WARNING", logger="declora.experiment"):
        build_experiment(load_config(None, [*overrides, f"run_dir={tmp_path / 'r'}"]))
    said = re.search(
        r"(\d+) of (\d+) training responses are empty: those rows train on the end of turn alone", caplog.text
    )
    assert said and 0 < int(said[1]) < int(said[2])  # the empty half of the training rows, counted


def test_a_missing_response_is_refused_by_row_while_an_empty_one_is_kept(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": ""}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(
        ValueError, match=r"^.*qa.jsonl:2: no value in column 'response' \(data.response_column\)"
    ):
        read_instructions(str(data), "train", DataConfig())
    data.write_text(json.dumps({"prompt": "a", "response": ""}) + "\n")
    assert read_instructions(str(data), "train", DataConfig()).responses == [""]


def test_a_template_that_writes_bos_gives_rows_with_one_bos_as_inference_does():
    """A Mistral-style template starts with {{ bos_token }} and the tokenizer adds BOS too: the training
    row's prompt is what apply_chat_template(..., add_generation_prompt=True) gives at inference (one BOS),
    not two; without a template the role: content prompt keeps the tokenizer's one BOS."""
    from declora.tasks import Instruction

    tokenizer = special_adding_tokenizer("<s> $A")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    turns = [{"role": "user", "content": "what is two plus two?"}]
    (row,), (n,) = Instruction(tokenizer, 64).encode_pairs([json.dumps(turns)], ["four."])
    stock = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert row[: len(row) - n] == list(stock["input_ids"]) and row.count(tokenizer.bos_token_id) == 1
    tokenizer.chat_template = None
    (plain,), (m,) = Instruction(tokenizer, 64).encode_pairs([json.dumps(turns)], ["four."])
    assert plain[0] == tokenizer.bos_token_id and plain.count(tokenizer.bos_token_id) == 1


def test_a_tokenizer_that_appends_eos_ends_no_prompt_with_it():
    """Without a chat template, a tokenizer that writes EOS after every text would end the role: content
    prompt with EOS, before the response: the rows are those of the same tokenizer without it, where EOS
    ends the response only."""
    with_eos, without = special_adding_tokenizer("<s> $A </s>"), special_adding_tokenizer("<s> $A")
    turns = [json.dumps([{"role": "user", "content": "what is two plus two?"}])]
    (row, *_), (n, *_) = Instruction(with_eos, 64).encode_pairs(turns, ["four."])
    assert (row, n) == tuple(x[0] for x in Instruction(without, 64).encode_pairs(turns, ["four."]))
    assert row.count(with_eos.eos_token_id) == 1 and row[-1] == with_eos.eos_token_id
