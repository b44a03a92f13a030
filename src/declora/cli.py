"""Command line: ``declora run | report | topology | export``. The only module that prints."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from declora.config import ConfigError, load_config

# configs/default.yaml of the working directory, else of the source checkout (editable installs).
DEFAULT_CONFIGS = (Path("configs/default.yaml"), Path(__file__).resolve().parents[2] / "configs/default.yaml")


def _config_path(arg: str | None) -> Path | None:
    if arg is not None:
        return Path(arg)
    return next((p for p in DEFAULT_CONFIGS if p.is_file()), None)


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from declora.engine import run
    from declora.experiment import build_experiment
    from declora.report import format_table, read_metrics, summarize

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a declora run folder?")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(_config_path(args.config), args.overrides)
        run_dir = None
    exp = build_experiment(cfg, run_dir)
    print(f"run folder: {exp.run_dir}  ({exp.n} nodes, {cfg.algorithm.name}, {cfg.topology.graph})")
    bar = tqdm(total=cfg.rounds, desc="rounds", unit="round", dynamic_ncols=True)

    def on_round(record: dict) -> None:
        bar.n = record["round"]
        shown = {"loss": f"{record['train_loss']:.3f}", "MB": f"{record['bytes_total'] / 1e6:.1f}"}
        if "acc_avg_factors" in record:
            shown["acc"] = f"{100 * record['acc_avg_factors']:.1f}"
        bar.set_postfix(shown)
        bar.refresh()

    try:
        run(exp, resume=bool(args.resume), on_round=on_round)
    finally:
        bar.close()
    print(format_table(summarize(read_metrics(exp.run_dir / "metrics.jsonl"))))
    print(
        f"\nmetrics: {exp.run_dir / 'metrics.jsonl'}   plot: {exp.run_dir / 'curves.png'}   "
        f"adapters: {exp.run_dir / 'adapters'}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from declora.report import write_report

    for run_dir in args.run_dirs:
        print(f"## {run_dir}\n")
        print(write_report(Path(run_dir)))
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from declora.schedules import build_schedule, describe, draw

    cfg = load_config(_config_path(args.config), args.overrides)
    schedule = build_schedule(cfg.topology, cfg.nodes, cfg.seed)
    for key, value in describe(schedule).items():
        print(f"{key}: {value}")
    draw(schedule, args.out)
    print(f"picture: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="declora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every node's partition and more")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an experiment: declora run [CONFIG] [key=value ...]")
    p.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. nodes=16 topology.graph=ring")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="table and plot from existing run folders")
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("topology", help="describe and draw a config's communication graph")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default="topology.png")
    p.set_defaults(func=cmd_topology)
    return parser


def _split_overrides(args: argparse.Namespace) -> None:
    # "declora run nodes=4" puts the override in the config slot; move it back.
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _split_overrides(args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"declora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
