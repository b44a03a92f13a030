"""Checks of the privacy, robust and attack sections against each other and the method, before any work
(validation.validate calls ``validate_guard``): a run labelled private, defended or attacked must be so,
and settings that would silently protect nothing are refused with what to set instead."""

from __future__ import annotations

import dataclasses
import math

from declora.algorithms import GOSSIP_ALGORITHMS, MASKED_UPLOADS, NO_NODE_DP, SERVER_ALGORITHMS, SHIPPED
from declora.attack import DATA_ATTACKS, MESSAGE_ATTACKS
from declora.config import Config, ConfigError
from declora.privacy import import_accountants
from declora.robust import trimmed_cut
from declora.validation import refuse_if_set

# The largest privacy.noise_multiplier and privacy.target_epsilon taken: beyond them nothing is learned or
# nothing is private, and opacus' search for the noise of a huge epsilon never ends (floats run out).
MAX_PRIVACY = 1e4


def validate_guard(cfg: Config) -> None:
    _validate_privacy(cfg)
    _validate_robust(cfg)
    _validate_attack(cfg)


def _validate_privacy(cfg: Config) -> None:
    p = cfg.privacy
    if p.level == "none":  # a budget or noise level asked for with DP off would be silently dropped
        why = (
            "with privacy.level=none (no differential privacy); set privacy.level=node or example, or drop it"
        )
        refuse_if_set("privacy", p, [f.name for f in dataclasses.fields(p)], why)
        return
    if not p.clip > 0:
        raise ConfigError(f"privacy.clip={p.clip} must be positive (.inf: no clipping)")
    if (p.noise_multiplier is None) == (p.target_epsilon is None):
        raise ConfigError(
            f"privacy.level={p.level} needs exactly one of privacy.noise_multiplier and "
            "privacy.target_epsilon; "
            f"got noise_multiplier={p.noise_multiplier}, target_epsilon={p.target_epsilon}"
        )
    if p.noise_multiplier is not None and not 0 <= p.noise_multiplier <= MAX_PRIVACY:
        raise ConfigError(
            f"privacy.noise_multiplier={p.noise_multiplier} is out of range; allowed: [0, {MAX_PRIVACY:.0f}] "
            "(the noise's std is it times privacy.clip; far below the limit the updates already drown)"
        )
    if math.isinf(p.clip) and p.noise_multiplier:  # the noise is noise_multiplier x clip
        raise ConfigError(
            f"privacy.clip={p.clip} with privacy.noise_multiplier={p.noise_multiplier}: the noise's scale is "
            "their product, so unbounded; give a finite clip (.inf only with noise_multiplier=0, no DP noise)"
        )
    if p.target_epsilon is not None and not (0 < p.target_epsilon <= MAX_PRIVACY and math.isfinite(p.clip)):
        raise ConfigError(
            f"privacy.target_epsilon={p.target_epsilon} must be in (0, {MAX_PRIVACY:.0f}], with a finite "
            f"privacy.clip (got {p.clip}); an epsilon above about 10 already promises little privacy"
        )
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta={p.delta} must be in (0, 1)")
    if p.level == "node" and cfg.algorithm.name not in SHIPPED:
        raise ConfigError(
            f"privacy.level=node with the registered algorithm {cfg.algorithm.name}: the accountant counts "
            "the messages each shipped method sends per round, and cannot know a new method's; use "
            "privacy.level=example (DP-SGD inside local training)"
        )
    if p.level == "node" and cfg.algorithm.name in ("local", "centralized"):
        raise ConfigError(
            f"privacy.level=node with algorithm.name={cfg.algorithm.name}: node-level DP noises what a node "
            "sends, and it sends nothing, so the run would be labelled private with nothing noised; use "
            "privacy.level=example (DP-SGD inside local training) or privacy.level=none"
        )
    if p.level == "node" and cfg.algorithm.name in NO_NODE_DP:
        raise ConfigError(
            f"privacy.level=node is not supported for algorithm.name={cfg.algorithm.name}: its tracking "
            "message is in gradient units, which node-level DP's clip and accounting do not cover; use "
            "privacy.level=example"
        )
    try:
        import_accountants()
    except ImportError as err:
        raise ConfigError(
            f"privacy.level={p.level} needs opacus' accountants: pip install 'declora[privacy]' ({err})"
        ) from err


def _validate_robust(cfg: Config) -> None:
    r, name = cfg.robust, cfg.algorithm.name
    servers = SERVER_ALGORITHMS + MASKED_UPLOADS
    ranks = cfg.algorithm.ranks or ()
    if r.aggregator == "mean":
        pass
    elif name not in SHIPPED:
        raise ConfigError(
            f"robust.aggregator={r.aggregator} is wired into declora's own methods' exchanges one by one; "
            f"the registered algorithm {name} cannot use it (robust.aggregator=mean)"
        )
    elif r.aggregator == "krum" and (name == "fslora" or (name in MASKED_UPLOADS and len(set(ranks)) > 1)):
        which = "random sketches" if name == "fslora" else f"algorithm.ranks={list(ranks)}"
        raise ConfigError(
            f"robust.aggregator=krum compares whole uploads, but algorithm.name={name}'s nodes upload "
            f"different rank components ({which}): there is no common vector to compare; use "
            "trimmed_mean, median or clipped (per component, over the nodes that sent it)"
        )
    elif r.aggregator == "krum" and name == "scaffold":
        raise ConfigError(
            "robust.aggregator=krum with algorithm.name=scaffold: Krum would make one node's control-variate "
            "change the server's, so c stops being the mean of the nodes' c_i, the corrections c - c_i no "
            "longer cancel and the model drifts; use trimmed_mean, median or clipped"
        )
    elif r.aggregator == "krum" and name not in servers:
        raise ConfigError(
            f"robust.aggregator=krum runs at a server; algorithm.name={name} is not one of {list(servers)}"
        )
    elif name not in GOSSIP_ALGORITHMS + servers:
        raise ConfigError(
            f"robust.aggregator={r.aggregator} needs a plain gossip or a server aggregate; "
            f"algorithm.name={name} "
            + ("sends nothing" if name in ("local", "centralized") else "mixes otherwise")
            + f": use one of {sorted(GOSSIP_ALGORITHMS + servers)}"
        )
    if r.aggregator == "trimmed_mean":
        _refuse_trimming_nothing(cfg)
    if r.aggregator == "clipped" and math.isinf(r.clip_radius) and not cfg.allow_degenerate:
        raise ConfigError(
            "robust.aggregator=clipped with robust.clip_radius=inf never clips: it is the plain mean, and an "
            "attacked run would be reported as defended; give a radius, or allow_degenerate=true if that is "
            "what you mean"
        )
    if r.aggregator == "krum":  # Krum scores each upload by its |S| - f - 2 nearest others: |S| > 2f + 2
        from declora.algorithms.server import clients_per_round

        senders = clients_per_round(cfg) or cfg.nodes
        if senders <= 2 * r.krum_f + 2:
            raise ConfigError(
                f"robust.krum_f={r.krum_f} with {senders} uploads a round: Krum needs more than 2f + 2 = "
                f"{2 * r.krum_f + 2} uploads (it scores each by its |S| - f - 2 nearest others); lower "
                "krum_f or sample more nodes"
            )
        dropping = {
            "topology.node_dropout": cfg.topology.node_dropout or None,
            "stragglers.deadline": cfg.stragglers.deadline,
        }
        for key, value in dropping.items():
            if value is not None and not cfg.allow_degenerate:
                raise ConfigError(
                    f"robust.aggregator=krum with {key}={value:g}: offline or late nodes do not upload, so a "
                    f"round can have 2f + 2 = {2 * r.krum_f + 2} uploads or fewer, where Krum may pick an "
                    "attacker's; use robust.aggregator=median or trimmed_mean, or allow_degenerate=true to "
                    "run those rounds anyway (each is warned about)"
                )


def _most_values_mixed(cfg: Config, enough: int) -> tuple[int, str]:
    """The most values one aggregation of the run can see, and where: a server's uploads in a round; in
    gossip, the nonzero entries of a row of W(t) (a node's neighbours, and itself where W_ii > 0), over
    the run's rounds, stopping early once some round reaches ``enough``. Link failures and dropout only
    remove values, so the graphs are read without them."""
    from declora.algorithms.server import clients_per_round
    from declora.schedules import SCHEDULES
    from declora.topology import mixing_matrix

    if cfg.algorithm.name not in GOSSIP_ALGORITHMS:
        return clients_per_round(cfg) or cfg.nodes, "uploads a round at the server"
    topo = cfg.topology
    on = f"topology.graph={topo.graph}" if topo.schedule == "static" else f"topology.schedule={topo.schedule}"
    where = f"values a node mixes at most on {on} (its neighbours, and itself where W_ii > 0)"
    try:
        at, static = SCHEDULES[topo.schedule](topo, cfg.nodes, cfg.seed)
        most = 0
        for t in range(1 if static else max(cfg.rounds, 1)):
            graph, rule, lazy = at(t)
            w = mixing_matrix(graph, topo if lazy else dataclasses.replace(topo, lazy=False), rule)
            most = max(most, int((w > 0).sum(1).max()))
            if most >= enough:
                break
    except (ValueError, KeyError, OSError):  # the graph's own check reports it, with its own message, later
        return cfg.nodes, "nodes"
    return most, where


def _refuse_trimming_nothing(cfg: Config) -> None:
    """trimmed_mean drops floor(trim * k) of k values at each end: where that is 0 for every aggregation the
    run can make, it is the plain mean, and an attacked run would be reported as defended."""
    trim = cfg.robust.trim
    k, where = _most_values_mixed(cfg, enough=math.ceil(1 / trim) if trim > 0 else cfg.nodes + 1)
    if trimmed_cut(k, trim) == 0 and not cfg.allow_degenerate:
        need = f"robust.trim >= {math.ceil(100 / k) / 100:g}" if k > 2 else "more values (a denser graph)"
        raise ConfigError(
            f"robust.trim={trim:g} drops floor({trim:g} x {k}) = 0 of the {k} {where}: trimmed_mean "
            f"would be the plain mean; use {need}, robust.aggregator=median, or allow_degenerate=true if "
            "that is what you mean"
        )


def _validate_attack(cfg: Config) -> None:
    a = cfg.attack
    if a.kind == "none":
        if a.nodes is not None:
            shown = list(a.nodes) if isinstance(a.nodes, tuple) else a.nodes  # as written: [0], not (0,)
            raise ConfigError(f"attack.nodes={shown} needs an attack.kind (not 'none')")
        return
    if a.nodes is None:
        raise ConfigError(f"attack.kind={a.kind} needs attack.nodes: a list of node ids or a fraction")
    if cfg.algorithm.name == "centralized":  # one model on all the data: nobody honest, nothing sent
        raise ConfigError(
            f"attack.kind={a.kind} with algorithm.name=centralized: its one node trains on all the data "
            "and sends nothing, so there is no attacker beside honest nodes; use attack.kind=none"
        )
    if cfg.algorithm.name == "local" and a.kind in MESSAGE_ATTACKS:
        raise ConfigError(
            f"attack.kind={a.kind} corrupts what a node sends; algorithm.name=local sends nothing "
            "(attack.kind=label_flip or none)"
        )
    honest = {"scaled": a.scale == 1, "gaussian": a.std == 0}.get(a.kind, False)  # 1·x, x + 0·z
    if honest and not cfg.allow_degenerate:
        key = "attack.scale=1" if a.kind == "scaled" else "attack.std=0"
        raise ConfigError(
            f"attack.kind={a.kind} with {key} sends the honest message: the run would be labelled "
            "attacked with nobody attacking; change it, or allow_degenerate=true if that is what you mean"
        )
    if isinstance(a.nodes, float) and not 0 < a.nodes < 1:
        ids = f"; node ids go in a list, e.g. attack.nodes=[{int(a.nodes)}]" if a.nodes.is_integer() else ""
        raise ConfigError(f"attack.nodes={a.nodes:g} as a fraction must be in (0, 1){ids}")
    if isinstance(a.nodes, float) and round(a.nodes * cfg.nodes) == 0:
        raise ConfigError(
            f"attack.nodes={a.nodes} of {cfg.nodes} nodes is round({a.nodes * cfg.nodes:g}) = 0 attackers: "
            "the run would be labelled attacked with nobody attacking; give a larger fraction or node ids"
        )
    if isinstance(a.nodes, tuple) and not all(0 <= i < cfg.nodes for i in a.nodes):
        raise ConfigError(f"attack.nodes={list(a.nodes)}: every id must be in [0, nodes={cfg.nodes})")
    if isinstance(a.nodes, tuple) and not a.nodes:
        raise ConfigError(
            "attack.nodes=[] names no attacker: the run would be labelled attacked with nobody attacking; "
            "give node ids, or attack.kind=none"
        )
    if isinstance(a.nodes, tuple) and len(set(a.nodes)) != len(a.nodes):
        raise ConfigError(f"attack.nodes={list(a.nodes)} names a node twice; give each attacker once")
    attackers = len(a.nodes) if isinstance(a.nodes, tuple) else round(a.nodes * cfg.nodes)
    if attackers >= cfg.nodes:
        raise ConfigError(
            f"attack.nodes={list(a.nodes) if isinstance(a.nodes, tuple) else a.nodes} makes all {cfg.nodes} "
            "nodes attackers: no honest node is left to score; leave at least one node honest"
        )
    if a.kind in DATA_ATTACKS and cfg.task.kind in ("causal_lm", "instruction"):
        raise ConfigError(
            f"attack.kind=label_flip needs class labels; task.kind={cfg.task.kind} trains on text, which it "
            "would leave as it is (the attacker would train on honest data); use a classification task or "
            "an attack on messages (sign_flip, scaled, gaussian)"
        )
