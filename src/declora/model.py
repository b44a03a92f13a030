"""The federation as one model: a frozen base with node-stacked LoRA in its target modules.

PEFT is the interchange format, not the training engine: any node's adapter (or a consensus adapter)
exports as a standard PEFT folder, and a PEFT adapter can seed every node of a run (declora.peft_io).

The base is an encoder with a sequence-classification head, or (``causal=True``) a causal LM such as a
LLaMA-family model: it has no per-node head (its LM head stays frozen and shared, like the embeddings).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from declora.assets import model_path
from declora.config import ModelConfig, shown_targets
from declora.device import PRECISIONS, autocast
from declora.lora import NodeRouting, RankMask, StackedLinear, StackedLoRALinear, lora_scale
from declora.metrics import gated
from declora.pooling import (
    mean_head_input,
    pooled_logits,
    resolve_pooling,
    skipped_by_mean,
    warn_unfollowed,
)
from declora.quantize import QuantizedLinear, quantize_linears
from declora.seeding import torch_generator
from declora.targets import is_target, layer_names, resolved_targets

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
# Where transformers puts sequence-classification heads: the head's layers train and gossip as one per-node
# head (DistilBERT's is pre_classifier, then classifier; LLaMA-family models' is score).
HEAD_ROOTS = ("pre_classifier", "classifier", "score")
KEEP_FP32 = (*HEAD_ROOTS, "lm_head")  # never quantized: trained heads, and the LM head tied to the embeddings
KINDS = ("A", "B", "head", "R")  # R: Fed-SB's r x r middle factor, present only when a layer has one


class Federation(nn.Module):
    """Holds the HF model (frozen) and, per adapted module, the stacked factors of all ``n`` nodes."""

    def __init__(
        self,
        model: nn.Module,
        n: int,
        cfg: ModelConfig,
        path: Path,
        routing: NodeRouting,
        lora: dict[str, StackedLoRALinear],
        heads: dict[str, StackedLinear],
        causal: bool = False,
        precision: str = "fp32",
        pooling: str = "cls",
        head_input: str | None = None,
        targets: tuple[str, ...] | str | None = None,
    ) -> None:
        super().__init__()
        self.model, self.n, self.cfg, self.path, self.routing = model, n, cfg, path, routing
        self.precision = (
            precision  # fp32 | bf16 (declora.device): the base's dtype and the forward's autocast
        )
        self.causal = causal  # a causal LM: logits (rows, seq, vocab), no classifier head
        self.pooling = pooling  # what the head reads: "cls" (the model's own) | "mean" (pooling.py)
        self.head_input = head_input  # mean pooling: how the head is handed the mean (mean_head_input)
        # model.target_modules with auto resolved (declora.targets): what the adapters name on export
        self.targets = cfg.target_modules if targets is None else targets
        # Sentence pairs on a model that embeds two segments (BERT's token types): the separator id after
        # whose first occurrence the second text starts (set by build_experiment); None: one segment.
        self.segment_sep: int | None = None
        # Most transformers causal LMs apply their LM head only at ``logits_to_keep`` positions.
        self.keeps_logits = causal and "logits_to_keep" in inspect.signature(model.forward).parameters
        self.lora, self.heads = lora, heads
        self.scale = lora_scale(cfg.alpha, cfg.rank, cfg.rslora)
        self.rank_mask = RankMask()  # per-node rank gates (n, r), one object shared by every layer
        # The global ids of the rows (a multi-process run hosts a slice of the nodes; build_experiment).
        self.node_ids = torch.arange(n)
        for layer in lora.values():
            layer.rank_mask = self.rank_mask

    # ---- the node-stacked tensors, by name: "<module>.lora_A", "<module>.lora_B" (and Fed-SB's
    # "<module>.lora_R"), "<head>.weight", "<head>.bias"
    def tensors(self, kinds: tuple[str, ...] = KINDS) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for name, layer in self.lora.items():
            if "A" in kinds:
                out[f"{name}.lora_A"] = layer.A
            if "B" in kinds:
                out[f"{name}.lora_B"] = layer.B
            if "R" in kinds and layer.R is not None:
                out[f"{name}.lora_R"] = layer.R
        if "head" in kinds:
            for name, head in self.heads.items():
                out[f"{name}.weight"] = head.weight
                if head.bias is not None:  # a head without a bias (LLaMA's score) gets none
                    out[f"{name}.bias"] = head.bias
        return out

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (layer.A.detach(), layer.B.detach()) for name, layer in self.lora.items()}

    @staticmethod
    def kind_of(tensor_name: str) -> str:
        leaf = tensor_name.rpartition(".")[2]
        return {"lora_A": "A", "lora_B": "B", "lora_R": "R"}.get(leaf, "head")

    @property
    def device(self) -> torch.device:
        """Where the base, the stacked tensors and every batch live (moved there by ``Module.to``)."""
        return next(iter(self.lora.values())).A.device

    def set_training(self, on: bool) -> None:
        """LoRA dropout on or off; the frozen base always runs in eval mode (no base dropout)."""
        for layer in self.lora.values():
            layer.dropout.train(on)

    @contextmanager
    def route(self, rows: Tensor, keys: Tensor | None = None) -> Iterator[None]:
        """Run the model with batch row k belonging to node ``rows[k]``; ``keys`` (rows,): the rows'
        dropout keys, needed to train with LoRA dropout (``NodeStreams.row_keys``)."""
        previous = self.routing.rows, self.routing.keys
        self.routing.rows = rows.to(self.device)
        self.routing.keys = None if keys is None else keys.to(self.device)
        try:
            yield
        finally:
            self.routing.rows, self.routing.keys = previous

    @contextmanager
    def override(self, stacked: dict[str, Tensor]) -> Iterator[None]:
        """Evaluate with other stacked tensors (leading axis m, any rank) in place of the nodes' own."""
        stacked = fold_middle(stacked)
        for name, layer in self.lora.items():
            layer.override = (stacked[f"{name}.lora_A"], stacked[f"{name}.lora_B"])
        for name, head in self.heads.items():
            head.override = (stacked[f"{name}.weight"], stacked.get(f"{name}.bias"))
        try:
            yield
        finally:
            layers: list[StackedLoRALinear | StackedLinear] = [*self.lora.values(), *self.heads.values()]
            for module in layers:
                module.override = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits: (rows, K) of the heads, or a causal LM's (rows, seq, V), or (rows, P, V) at the sorted
        ``positions`` (P,) only: the LM head then projects just those (``Task.positions``).

        The inputs are on ``self.device``; under precision=bf16 the forward runs in autocast and the logits
        come back as float32, so losses and metrics are computed in fp32."""
        with autocast(self.device, self.precision):
            logits = self._logits(input_ids, attention_mask, positions)
        return logits.float()

    def _logits(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor | None) -> Tensor:
        if not self.causal:
            segments = {}
            if self.segment_sep is not None:
                segments["token_type_ids"] = segment_ids(input_ids, self.segment_sep)
            if self.pooling == "mean":
                head_input = self.head_input or "vector"
                return pooled_logits(self.model, input_ids, attention_mask, head_input, **segments)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits
        # No generation here: a KV cache would only cost memory.
        if positions is not None and self.keeps_logits:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=positions
            ).logits
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits if positions is None else logits[:, positions]


def segment_ids(input_ids: Tensor, sep: int) -> Tensor:
    """The token types a BERT tokenizer gives a pair's rows ``[CLS] a [SEP] b [SEP]``: 0 up to and with
    the first ``sep``, 1 after it (padding after the last [SEP] gets 1 where the tokenizer writes 0; it is
    masked out of attention and pooling, so the logits are the same)."""
    is_sep = (input_ids == sep).long()
    return ((is_sep.cumsum(1) - is_sep) > 0).long()


def takes_segments(model: nn.Module) -> bool:
    """Whether the model embeds two segments apart (BERT, MiniLM: token_type_ids with 2 types or more);
    RoBERTa's one type, DistilBERT and causal LMs read a pair as one sequence."""
    types = getattr(getattr(model, "config", None), "type_vocab_size", 0) or 0
    return types >= 2 and "token_type_ids" in inspect.signature(model.forward).parameters


# ---------------------------------------------------------------- building


def _kaiming_uniform(rows: int, fan_in: int, generator: torch.Generator) -> Tensor:
    # PEFT's default lora_A init: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rows, fan_in, generator=generator) * 2 - 1) * bound


def add_middle_factors(fed: Federation) -> None:
    """Fed-SB: every adapted layer gets a frozen shared B (seeded per module from model.init_seed, as A)
    and a trained per-node R (n, r, r) = 0 between B and A (lora.StackedLoRALinear.add_middle)."""
    for name, layer in fed.lora.items():
        d_out = layer.B.shape[1]
        init_B = _kaiming_uniform(d_out, fed.cfg.rank, torch_generator(fed.cfg.init_seed, "B", name))
        layer.add_middle(init_B.to(layer.A.device))  # (d_out, r): U(-1/sqrt(r), 1/sqrt(r))


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def load_base(
    cfg: ModelConfig, num_labels: int, causal: bool = False, precision: str = "fp32"
) -> tuple[nn.Module, Path]:
    """The frozen transformers model; a classifier head is initialised from ``cfg.init_seed`` (same
    everywhere). ``causal``: the model as a causal LM (``num_labels`` unused). ``precision``: the
    frozen weights' storage dtype (the head is initialised in fp32 first, then every node's copy of it
    stays fp32: see StackedLinear)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = model_path(cfg.name)
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    hf_logging.disable_progress_bar()  # the console shows declora's rounds bar, and errors on one line
    with torch.random.fork_rng(devices=[]):  # the draws below are on the CPU; the model moves after
        torch.manual_seed(cfg.init_seed)
        if causal:
            model, loading = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]  # a pair, with info
                path, dtype=torch.float32, output_loading_info=True
            )
        else:
            # A base saved with a head of another label count (a fine-tuned checkpoint) gets a fresh one.
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
    redrawn = [*loading["missing_keys"], *(m[0] for m in loading.get("mismatched_keys") or ())]
    _refuse_untrained_frozen(cfg, path, model, redrawn, causal)
    for name, p in model.named_parameters():  # the head keeps its fp32 init; buffers (rotary) stay as built
        if not name.startswith(HEAD_ROOTS):
            p.data = p.data.to(PRECISIONS[precision])
    model.eval()  # base dropout off: the LoRA dropout is ours; see ModelConfig.dropout
    for p in model.parameters():
        p.requires_grad_(False)
    quantize_linears(model, cfg.base_quantization, KEEP_FP32, cfg.quant_backend)  # "none": untouched
    return model, path


def _refuse_untrained_frozen(
    cfg: ModelConfig, path: Path, model: nn.Module, redrawn: list[str], causal: bool
) -> None:
    """Weights the checkpoint lacks (or holds in another shape) start random. The head's train; any other
    would stay random and frozen for the whole run (a DeBERTa base's pooler, say), so the run is refused.
    What the model's own pooling applies before the head is not read when the head pools the token
    states itself (``pooling.MEAN_SKIPS``)."""
    mean = not causal and resolve_pooling(cfg.pooling, path, model) != "cls"
    frozen = [
        key
        for key in redrawn
        if not (not causal and key.startswith(HEAD_ROOTS)) and not (mean and skipped_by_mean(key))
    ]
    if frozen:
        hint = (
            "; or model.pooling=mean, whose head reads the token states" if skipped_by_mean(frozen[0]) else ""
        )
        raise ValueError(
            f"model.name={cfg.name!r}: {path} holds no weights for {frozen[:3]}"
            f"{f' and {len(frozen) - 3} more' if len(frozen) > 3 else ''}, which would start random and "
            "stay frozen (declora trains only the LoRA factors and the classifier head): use a checkpoint "
            f"that has them{hint}"
        )


def build_federation(
    cfg: ModelConfig,
    n: int,
    num_labels: int,
    causal: bool = False,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Federation:
    """``n`` nodes' stacked LoRA on one frozen base (``causal``: a causal LM, see ``load_base``), moved to
    ``device``; ``precision``: the base's storage dtype and the forward's autocast (declora.device)."""
    model, path = load_base(cfg, num_labels, causal, precision)
    pooling = "cls" if causal else resolve_pooling(cfg.pooling, path, model)  # before heads are stacked
    warn_unfollowed(cfg.pooling, pooling, path, model)
    head_input = mean_head_input(model) if pooling == "mean" else None
    unread = pooling == "mean"  # what the model's own pooling applies before the head: mean pooling skips it
    routing = NodeRouting()
    scale = lora_scale(cfg.alpha, cfg.rank, cfg.rslora)
    kinds = (nn.Linear, QuantizedLinear)
    targets = resolved_targets(cfg.target_modules, model, kinds)
    lora: dict[str, StackedLoRALinear] = {}
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, kinds)
            and is_target(targets, name)
            and not name.startswith(HEAD_ROOTS)
            and not (unread and skipped_by_mean(name))
        ):
            init_A = _kaiming_uniform(cfg.rank, module.in_features, torch_generator(cfg.init_seed, "A", name))
            lora[name] = StackedLoRALinear(module, n, cfg.rank, scale, cfg.dropout, routing, init_A, name)
    if not lora:
        raise ValueError(
            f"model.target_modules={shown_targets(cfg.target_modules)} matches no linear layer of "
            f"{path}; its linear layer names are {layer_names(model, kinds)}"
        )
    for name, layer in lora.items():
        _replace(model, name, layer)
    heads = {  # DistilBERT's pre_classifier under mean pooling stays frozen: nothing reads it
        name: StackedLinear(m, n, routing)
        for name, m in list(model.named_modules())
        if isinstance(m, nn.Linear) and name.startswith(HEAD_ROOTS) and not (unread and skipped_by_mean(name))
    }
    for name, head in heads.items():
        _replace(model, name, head)
        head.requires_grad_(cfg.head == "train")
    said = "no classifier head (a causal LM)" if causal else f"{len(heads)} head layers (pooling {pooling})"
    log.info("model %s: %d adapted modules, rank %d, %s, %d nodes", path, len(lora), cfg.rank, said, n)
    fed = Federation(
        model, n, cfg, path, routing, lora, heads, causal, precision, pooling, head_input, targets
    )
    return fed.to(device)


# ---------------------------------------------------------------- derived adapters


def fold_middle(stacked: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fed-SB's R folded into B: B_i <- B_i R_i (n, d_out, r), R dropped, so B A is the node's adapter
    (what PEFT loads). Stacks without R are returned as they are."""
    middles = [k for k in stacked if k.endswith(".lora_R")]
    if not middles:
        return stacked
    out = {k: v for k, v in stacked.items() if not k.endswith(".lora_R")}
    for k in middles:
        b = k.removesuffix(".lora_R") + ".lora_B"
        out[b] = torch.bmm(stacked[b].detach(), stacked[k].detach())  # (n, d_out, r)
    return out


def node_slice(stacked: dict[str, Tensor], node: int) -> dict[str, Tensor]:
    return {k: v[node : node + 1] for k, v in stacked.items()}


def node_adapter(
    fed: Federation, stacked: dict[str, Tensor], node: int, gates: Tensor | None = None
) -> dict[str, Tensor]:
    """Node ``node``'s effective adapter: only its active rank components (gate != 0), the gate's
    multiplier folded into B, so a rank-k export keeps the node's forward. No gate: ``node_slice``.
    ``gates``: every node's (n, r) (a multi-process run gathers them); None: the federation's own."""
    single = node_slice(stacked, node)
    gates = fed.rank_mask.gate if gates is None else gates
    if gates is None:
        return single
    gate = gates[node].detach()  # (r,)
    keep = gate.nonzero().flatten()
    out: dict[str, Tensor] = {}
    for k, v in single.items():
        if k.endswith(".lora_A"):  # (1, r, d_in) -> (1, k, d_in)
            v = v[:, keep.to(v.device)]
        elif k.endswith(".lora_B"):  # (1, d_out, r) -> (1, d_out, k)
            v = v[..., keep.to(v.device)] * gate[keep].to(v)
        out[k] = v
    return out


def as_run(fed: Federation, stacked: dict[str, Tensor], gates: Tensor | None) -> dict[str, Tensor]:
    """The adapters the nodes run. Under rank gates (n, r) (HetLoRA, FlexLoRA) node i's layer computes
    s B diag(gate_i) A x: the gates are folded into the factors, so that the consensus models average
    what the nodes use, and two nodes that store the same server model at different ranks are two models
    (as the consensus metrics already count them). No gates: ``stacked`` as it is."""
    if gates is None:
        return stacked
    out = dict(stacked)
    for name in fed.lora:
        A, B = f"{name}.lora_A", f"{name}.lora_B"
        out[A], out[B] = gated(stacked[A], stacked[B], gates)
    return out


def averaged_factors(stacked: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Tensor]:
    """Mean of every stacked tensor over the nodes (optionally weighted), keeping a node axis of 1.
    (Fed-SB: with A and B shared, the mean of R is the mean of the adapters B R_i A exactly.)"""
    if weights is None:
        return {k: v.detach().mean(0, keepdim=True) for k, v in stacked.items()}
    w = weights.to(torch.float32) / weights.sum()
    return {
        k: torch.einsum("n,n...->...", w.to(v.device), v.detach()).unsqueeze(0) for k, v in stacked.items()
    }


def averaged_product(stacked: dict[str, Tensor]) -> dict[str, Tensor]:
    """The exact mean of the products B_i A_i as one adapter of rank n*r, never forming B A.

    [B_1 ... B_n] / n  times  [A_1; ...; A_n]  =  mean_i B_i A_i   (Fed-SB: B_i R_i in place of B_i).
    """
    stacked = fold_middle(stacked)
    out: dict[str, Tensor] = {}
    for k, v in stacked.items():
        v = v.detach()
        n = v.shape[0]
        if k.endswith(".lora_A"):  # (n, r, d_in) -> (1, n*r, d_in)
            out[k] = v.reshape(1, -1, v.shape[-1])
        elif k.endswith(".lora_B"):  # (n, d_out, r) -> (1, d_out, n*r)
            out[k] = v.permute(1, 0, 2).reshape(1, v.shape[1], -1) / n
        else:
            out[k] = v.mean(0, keepdim=True)
    return out
