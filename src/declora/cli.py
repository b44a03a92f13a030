"""Command line: ``declora run | eval | report | compare | topology``. It prints, as do console (a run's
opening line and progress), run_setup (what a run runs, and under torchrun which rank's) and compare_jobs (the
lines of cells running in parallel); the other modules log."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from declora import __version__
from declora.config import ConfigError, load_config, repeated_overrides
from declora.console import EARLY_RECORDS, RoundsBar, announce_run, log_to_file, say_error
from declora.run_setup import config_path, die, join_run, run_config

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    from declora.checkpoint import check_layout
    from declora.engine import run
    from declora.experiment import build_experiment

    if args.dry_run:
        return _dry_run(args)
    cfg, run_dir, group = join_run(args)
    with group.guard():
        exp = build_experiment(cfg, run_dir, group)
        args.run_dir = exp.run_dir  # an interruption from here on names it in the line it says
        if group.world > 1:
            if args.resume:  # a launch with another process count is refused before it adds a rank log
                check_layout(exp, required=False)
            log_to_file(exp.run_dir / f"rank_{group.rank}.log")
            log.info("rank %d hosts nodes %s", group.rank, exp.group.nodes.tolist())
        bar = announce_run(exp, exp.group)
        try:
            run(exp, bool(args.resume), bar.on_round if bar else None, overwrite=args.overwrite)
        finally:
            if bar is not None:
                bar.close()
        group.close()
    if group.is_main:
        from declora.report import format_table, read_metrics, summarize

        print(format_table(summarize(read_metrics(exp.run_dir / "metrics.jsonl"))))
        adapters = exp.run_dir / "adapters"
        shown = f"   adapters: {adapters}" if adapters.is_dir() else ""  # none with export=none
        print(f"\nmetrics: {exp.run_dir / 'metrics.jsonl'}   plot: {exp.run_dir / 'curves.png'}{shown}")
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """declora run --dry-run: the checks, the first rounds in memory and the plan (declora.dry_run)."""
    from declora.dist import launched
    from declora.dry_run import ONE_PROCESS, TRIAL_ROUNDS, plan
    from declora.experiment import build_experiment

    if args.resume:
        raise ConfigError("--dry-run plans a new run; --resume continues one: give one of them")
    if launched():
        raise ConfigError(ONE_PROCESS)
    cfg, run_dir = run_config(args)
    began = time.perf_counter()
    exp = build_experiment(cfg, run_dir)
    setup_s = time.perf_counter() - began
    print(
        f"dry run: {TRIAL_ROUNDS} rounds and an evaluation in memory, and the run's writes in a temporary "
        "folder, to time them; nothing is kept"
    )
    lines = plan(exp, args.overwrite, setup_s)
    print("\n".join(["what the run would do:", *lines]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """declora eval ADAPTER [ADAPTER ...] [CONFIG] [key=value ...]: adapters scored on held-out rows
    (declora.adapter_eval); a CONFIG is a .yaml/.yml file, every other path an adapter folder."""
    import json

    from declora.adapter_eval import eval_config, lines, score_all, table

    overrides = [*(p for p in args.paths if "=" in p), *args.overrides]
    configs = [p for p in args.paths if "=" not in p and p.endswith((".yaml", ".yml"))]
    adapters = [p for p in args.paths if "=" not in p and p not in configs]
    if not adapters:
        raise ConfigError("declora eval needs an adapter folder: declora eval ADAPTER [CONFIG] [key=value]")
    if len(configs) > 1:
        raise ConfigError(f"declora eval takes one config file; got {configs}")
    config = configs[0] if configs else None
    prepared = [eval_config(adapter, config, overrides) for adapter in adapters]  # all checked first
    if not args.json:
        print(f"scoring {', '.join(adapters)} ...", file=sys.stderr, flush=True)
    results = score_all([cfg for cfg, _ in prepared])
    if args.json:  # one JSON object a line, an adapter each
        print("\n".join(json.dumps(result) for result in results))
    elif len(results) == 1:
        print("\n".join(lines(results[0], prepared[0][1])))
    else:
        origins = dict.fromkeys(origin for _, origin in prepared)
        print("\n".join([*(f"config    {origin}" for origin in origins), *table(results)]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from declora.compare import check_metric
    from declora.compare_table import write_comparison
    from declora.report import read_metrics, write_report
    from declora.runfolder import in_use, is_run_folder

    check_metric(args.metric, args.target, "--")
    compared = args.out != "runs/report" or args.metric != "acc_avg_factors" or args.target is not None
    if len(args.run_dirs) == 1 and compared:
        raise ConfigError(
            "--out, --metric and --target set the comparison of two or more runs; one run's report goes to "
            "its own folder (report.md, curves.png)"
        )
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise ConfigError(f"{run_dir}: no metrics.jsonl there; is it a declora run folder?")
    if len(args.run_dirs) > 1 and not any(
        r.get(args.metric) is not None for d in args.run_dirs for r in read_metrics(Path(d) / "metrics.jsonl")
    ):
        raise ConfigError(
            f"--metric {args.metric}: none of the runs logged it; pick a metric they log "
            "(acc_avg_factors for every classifier, acc_server for server algorithms)"
        )
    if len(args.run_dirs) > 1:  # the comparison's folder, made before any report is printed
        if not args.out.strip():
            raise ConfigError("--out '' names no folder; give the comparison's folder (default runs/report)")
        if is_run_folder(Path(args.out)):
            raise ConfigError(
                f"--out {args.out} is a run folder: the comparison goes into a folder of its own "
                "(default runs/report), not among a run's files"
            )
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out {args.out!r}: cannot make that folder ({err.strerror})") from err
    for run_dir in args.run_dirs:
        print(f"## {run_dir}\n")
        running = in_use(Path(run_dir))  # its own report.md and curves.png are written as it ends
        print(write_report(Path(run_dir), write=not running))
        if running:
            print(f"\n(still running: another declora process writes {run_dir}; nothing was written there)")
    if len(args.run_dirs) > 1:  # one row per run folder, as a grid would show them
        names = [Path(d).name for d in args.run_dirs]  # the full path where two folders share a name
        labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, args.run_dirs, strict=True)]
        runs = {label: [Path(d)] for label, d in zip(labels, args.run_dirs, strict=True)}
        print(f"\n## comparison ({args.out})\n")
        print(write_comparison(runs, Path(args.out), args.metric, args.target))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from declora.compare import (
        SKIPPED,
        STATE_WORDS,
        group_cells,
        holding_grid,
        load_grid,
        pair_groups,
        run_grid,
    )
    from declora.compare_table import write_comparison

    if args.grid is None:  # argparse would also call the optional overrides required
        raise ConfigError("declora compare needs a grid file: declora compare GRID [key=value ...]")
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '' names no folder; give the grid's output folder, or leave --out out")
    if args.jobs < 1:
        raise ConfigError(
            f"--jobs {args.jobs}: give how many cells run at once, 1 or more (1: one after another)"
        )
    grid = load_grid(args.grid, tuple(args.overrides), args.out)
    if args.dry_run:
        from declora.dry_run import grid_plan

        if _cell_flags(args):
            raise ConfigError("--dry-run plans the whole grid, not one --cell of it")
        grid_plan(grid, lambda line: print(line, flush=True))
        return 0
    if _cell_flags(args):  # one cell of a --jobs grid, in the process declora.compare_jobs started
        from declora.compare_jobs import stop_with, the_cell

        stop_with(args.cell_parent)
        grid = the_cell(grid, args.cell, args.cell_config)

    bar: list[RoundsBar] = []  # the running cell's progress bar

    def on_cell(k: int, total: int, cell, state: str) -> None:
        while bar:
            bar.pop().close()
        print(f"[{k + 1}/{total}] {cell.method} seed={cell.seed}: {STATE_WORDS[state]}", flush=True)
        if state not in SKIPPED:
            bar.append(RoundsBar((cell.cfg or load_config(grid.base, cell.overrides)).rounds, grid.metric))

    def on_round(record: dict) -> None:
        if bar:
            bar[0].on_round(record)

    if args.cell is not None:  # the table is the whole grid's, written by the command that started the cell
        run_grid(grid, on_cell, on_round)
        return 0
    with holding_grid(grid.out):
        if args.jobs > 1:
            from declora.compare_jobs import run_parallel

            outcome = run_parallel(grid, args.grid, list(args.overrides), args.jobs, verbose=args.verbose)
            if outcome.failed:
                for line in outcome.failed:
                    print(f"declora: error: {line}", file=sys.stderr)
                print(
                    "declora: no table: see the failed cells' logs, mend what failed and run the same "
                    "command again (finished cells are skipped)",
                    file=sys.stderr,
                )
                return 1
            cells = outcome.cells
        else:
            cells = run_grid(grid, on_cell, on_round)
        while bar:
            bar.pop().close()
        groups = pair_groups(cells, grid.pair_within)
        table = write_comparison(group_cells(cells), grid.out, grid.metric, grid.target_accuracy, groups)
    print(
        f"\n{table}\n\ntable: {grid.out / 'comparison.md'}  csv: {grid.out / 'comparison.csv'}  "
        f"figures: {grid.out / 'comparison.png'}"
    )
    return 0


def _cell_flags(args: argparse.Namespace) -> bool:
    """Whether this is a cell's own process (--cell, --cell-config, --cell-parent: compare_jobs gives all
    three); a user who gives some of them is told what they are."""
    given = [args.cell is not None, args.cell_config is not None, args.cell_parent is not None]
    if not any(given):
        return False
    if not all(given) or args.jobs != 1:
        raise ConfigError(
            "--cell is the flag declora compare --jobs gives the process of one cell; run a grid with "
            "declora compare GRID [--jobs J]"
        )
    return True


def _rounded(value: Any) -> Any:
    """Floats to 10 significant digits for display (1/3 as 0.3333333333, not 0.33333333333333337)."""
    if isinstance(value, float):
        return float(f"{value:.10g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def cmd_topology(args: argparse.Namespace) -> int:
    from declora.algorithms.alternating import auto_interval
    from declora.schedules import build_schedule, describe, draw
    from declora.stragglers import Stragglers, enabled

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out}: the picture is a PNG; give a path ending in .png")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: folder {str(out.parent)!r} does not exist")
    cfg = load_config(config_path(args.config), args.overrides)
    from declora.ignored import ignored_settings

    for line in ignored_settings(cfg):  # as declora run says it, for the keys that shape the graph
        if line.startswith(("topology.", "nodes=")):
            log.warning(line)
    # the run's W(t): with a straggler deadline, a node late in a round is offline in it (declora.stragglers)
    timed = enabled(cfg) and cfg.stragglers.deadline is not None
    schedule = build_schedule(
        cfg.topology, cfg.nodes, cfg.seed, Stragglers(cfg, cfg.nodes).late if timed else None
    )
    info = describe(schedule)
    for key, value in info.items():
        print(f"{key}: {_rounded(value)}")
    rho = info["rho"]  # the interval TAD-LoRA picks with switch_interval=auto
    c, cap = cfg.algorithm.auto_c, cfg.algorithm.auto_max
    auto_t = auto_interval(rho, c, cap)
    print(f"tad_lora auto T: {auto_t}  (ceil({c} / sqrt(1 - rho)) in [1, {cap}], rho = {rho:.4f})")
    draw(schedule, args.out)
    print(f"picture: {args.out}")
    return 0


EXAMPLES = """examples:
  declora run                                      the default experiment (configs/default.yaml)
  declora run configs/smoke.yaml nodes=4 rounds=2  a config with overrides; the folder goes under runs/
  declora run --resume RUN_DIR rounds=40           continue a stopped run (or extend a finished one)
  declora run configs/smoke.yaml --dry-run         check a run, time 2 rounds, print its plan; keeps nothing
  declora eval RUN_DIR/adapters/consensus          score an adapter on held-out rows (data.test_file=...)
  declora compare configs/grids/smoke.yaml         a grid of runs, paired by seed, in one table
  declora report RUN_DIR [RUN_DIR ...]             report.md and curves.png; several runs compared
  declora topology topology.graph=torus nodes=16   the graph, its mixing rate, a picture
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="declora",
        description="Decentralized and federated LoRA fine-tuning: every node trains its own adapter on its "
        "own data over one shared frozen base, and the nodes gossip with their neighbours (or meet at a "
        "server). Each command takes a YAML config and dotted key=value overrides (README: Configuration).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every node's partition and more")
    parser.add_argument("--version", action="version", version=f"declora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an experiment: declora run [CONFIG] [key=value ...]")
    p.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. nodes=16 topology.graph=ring; run_dir=PATH names the run folder "
        "(default: runs/<algorithm>-<date>-<time>)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run folder of an earlier run (run_dir=...)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check a run makes, time its first two rounds and an evaluation in memory, and "
        "print what the run would do and cost (examples, messages, time, memory); nothing is kept",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "eval",
        help="score adapters on held-out rows: declora eval ADAPTER [ADAPTER ...] [CONFIG] [key=value ...]",
        usage="declora eval [-h] [--json] ADAPTER [ADAPTER ...] [CONFIG] [key=value ...]",
        description="Score LoRA adapter folders (declora exports, or PEFT's save_pretrained folders) on a "
        "config's held-out rows with a run's metrics and fixed evaluation set. Config: the .yaml given, "
        "else the adapter's own run's (a declora export whose run folder is there), else "
        "configs/default.yaml; each adapter's rank, alpha and target modules are its own. Nothing is "
        "written.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="ADAPTER [CONFIG] [key=value]",
        help="adapter folders (RUN_DIR/adapters/consensus, RUN_DIR/adapters/node_*, PEFT folders), at most "
        "one .yaml config, and dotted overrides (data.test_file=other.csv)",
    )
    p.add_argument("--json", action="store_true", help="print each adapter's numbers as a JSON line")
    p.set_defaults(func=cmd_eval, overrides=[])
    p = sub.add_parser("report", help="table and plot from existing run folders")
    p.add_argument(
        "run_dirs",
        nargs="+",
        help="run folders: each gets its report.md and curves.png; two or more are also compared",
    )
    p.add_argument(
        "--out",
        default="runs/report",
        help="where the comparison of several runs goes (default: runs/report, replaced by the next one)",
    )
    p.add_argument("--metric", default="acc_avg_factors", help="key to rank (ppl_*: lowest is best)")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="a value of --metric whose bytes-to-reach is reported (accuracies as fractions: 0.8 for 80%%)",
    )
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "compare",
        help="run a grid of experiments and compare them: declora compare GRID [key=value ...]",
        # GRID is required (cmd_compare says so)
        usage="declora compare [-h] [--out OUT] [--jobs J] [--dry-run] GRID [key=value ...]",
        description="Run every cell of a grid (finished cells are skipped) and write OUT/comparison.md, "
        ".csv and .png: each method's final and best values over seeds and, with two or more seeds, every "
        "method against the first paired by seed (per-seed differences, mean ± SE, 95% t-interval).",
    )
    p.add_argument("grid", nargs="?", help="grid YAML (configs/grids/smoke.yaml)")  # checked in cmd_compare
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every cell, e.g. rounds=2")
    p.add_argument("--out", default=None, help="output folder (default: the grid's out)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="J",
        help="cells run at once (default 1: one after another), each in its own process with CPUs/J "
        "threads unless the grid sets threads, its output in OUT/cell_logs; a failed cell stops no other "
        "but no new one starts (exit 1); Ctrl-C stops them all, and the same command goes on. Pays on a "
        "GPU or a many-core CPU",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every cell, say what the grid would do with each, time one cell of each method as "
        "declora run --dry-run does, and estimate the grid's time; nothing is kept",
    )
    # one cell's own process (declora.compare_jobs): its place, its config's fingerprint, the command's pid
    p.add_argument("--cell", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cell-config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cell-parent", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("topology", help="describe and draw a config's communication graph")
    p.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. nodes=16 topology.graph=ring")
    p.add_argument(
        "--out", default="topology.png", help="the picture: a .png path (default: topology.png here)"
    )
    p.set_defaults(func=cmd_topology)
    return parser


def _split_overrides(args: argparse.Namespace) -> None:
    # "declora run nodes=4" puts the override in the config slot; move it back.
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with key=value overrides allowed on both sides of a flag."""
    parser = build_parser()
    words = sys.argv[1:] if argv is None else argv
    for flag in (
        "--resume",
        "--out",
        "--metric",
        "--target",
        "--jobs",
    ):  # argparse would keep the last silently
        if sum(w == flag or w.startswith(f"{flag}=") for w in words) > 1:
            parser.error(f"{flag} is given more than once; give it once")
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first flag: `run a=1 --overwrite b=2` leaves b=2 over.
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        where = (
            " (-v goes before the command: declora -v run ...)" if {"-v", "--verbose"} & set(stray) else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}{where}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _split_overrides(args)
    return args


# What an interrupted command leaves, and how to go on (every write is atomic: nothing is half-written).
INTERRUPTED = {
    "run": "the run folder keeps its last checkpoint: {resume} continues from it",
    "compare": "finished cells are kept: the same declora compare command continues the grid",
}


def _interrupted_line(args: argparse.Namespace) -> str:
    """How to go on after an interruption: a run names its folder once it holds a run (config.yaml)."""
    if args.command != "run":
        return INTERRUPTED.get(args.command, "nothing was lost")
    from declora.runfolder import resume_command

    folder = getattr(args, "run_dir", None) or args.resume
    if folder is not None and (Path(folder) / "config.yaml").is_file():
        if not (Path(folder) / "state" / "latest.json").is_file():  # stopped in its first rounds
            return f"the run folder holds no checkpoint yet: {resume_command(folder)} starts it from round 0"
        return INTERRUPTED["run"].format(resume=resume_command(folder))
    return "the run had not started (no run folder was written): the same command starts it"


class Terminated(BaseException):
    """SIGTERM (kill, a batch scheduler's time limit), raised like Ctrl-C's KeyboardInterrupt so that the
    run unwinds the same way: its lock released, its last checkpoint kept, one line said."""


class HungUp(Terminated):
    """SIGHUP (the terminal closed, an ssh session dropped): stopped as on SIGTERM, not killed mid-round."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise HungUp if signum == signal.SIGHUP else Terminated


def main(argv: list[str] | None = None) -> int:
    from declora.dist import AgreedStop, DistributedRunError, JobStopped, launched

    args = parse_cli(argv)
    quiet, several = _set_up_process(args, own_process=argv is None)
    if args.command != "run" and several:  # every rank would run the whole command, racing on its files
        return _refuse_torchrun(args)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Terminated, JobStopped) as stop:
        return _stopped(stop, args, several, quiet)
    except BrokenPipeError:  # the reader of stdout left (| head): stop quietly, as a pipe's writer does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except AgreedStop as err:  # every rank found it together (a NaN): no rank is at fault
        if several:  # said once per host, as one process says it; no wait on the peers (as run_setup.die)
            if os.environ.get("LOCAL_RANK", "0") == "0":
                say_error(err, 1)
            logging.shutdown()
            os._exit(1)
        return say_error(err, 1)
    except DistributedRunError as err:
        die(str(err))
        return 1
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        from declora.engine import failed_in_round

        where = failed_in_round(err)
        if where is None:  # a bad value or file: nothing ran (or nothing was lost)
            if launched():  # the process group is up: an ordinary exit could abort in its teardown
                say_error(err, 2)
                logging.shutdown()
                os._exit(2)
            return say_error(err, 2)
        if isinstance(err, ConfigError):  # declora's own message, found in a round: one line, and rounds ran
            return say_error(ConfigError(f"{where}: {err}"), 1)
        traceback.print_exception(err)  # a bug in a round's work (a plugin's, say): its note says where
        return 1
    except (
        ArithmeticError,
        OSError,
    ) as err:  # NumericalError (diverged), disk full, read-only: the last checkpoint is kept
        return say_error(err, 1)


def _set_up_process(args: argparse.Namespace, own_process: bool) -> tuple[bool, bool]:
    """Signals (in the command line's own process, not a caller of main() in its program), the console's
    log level, and the warnings about overrides given twice. Returns (quiet, several): this rank keeps
    the console for errors, and torchrun started more than one process."""
    from declora.dist import launched

    if own_process:
        signal.signal(signal.SIGTERM, _raise_terminated)
        hangup = getattr(signal, "SIGHUP", None)  # none on Windows
        if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:  # nohup leaves it ignored
            signal.signal(hangup, _raise_terminated)
    # Under torchrun only rank 0 talks on the console (other ranks: errors only, details in rank_K.log).
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    several = launched() and int(os.environ["WORLD_SIZE"]) > 1
    if several:  # rank_K.log opens once the run folder is known: keep what is logged before
        EARLY_RECORDS.hold()
    for line in repeated_overrides(getattr(args, "overrides", None) or ()):
        logging.getLogger("declora.cli").warning(line)
    return quiet, several


def _refuse_torchrun(args: argparse.Namespace) -> int:
    """A command other than run under torchrun: local rank 0 says so, the others wait to be stopped."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        say_error(
            ConfigError(
                f"declora {args.command} runs in one process: start it without torchrun "
                "(a multi-process run is `torchrun ... -m declora run`)"
            ),
            2,
        )
        return 2
    # The other ranks wait for torchrun to stop them once local rank 0 has left: leaving first, they
    # would have torchrun stop rank 0 before it had said why (seen in CI). SIGTERM then ends them
    # quietly; the wait is bounded should nothing stop them.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(60)
    return 2


def _stopped(stop: BaseException, args: argparse.Namespace, several: bool, quiet: bool) -> int:
    """Ctrl-C, a signal or a stopped job: one line saying how to go on, and 128 + the signal."""
    from declora.dist import JobStopped

    code, what = (130, "interrupted") if isinstance(stop, KeyboardInterrupt) else (143, "terminated")
    if isinstance(stop, HungUp):
        code, what = 129, "hung up (its terminal closed)"
    line = _interrupted_line(args)
    if several and isinstance(stop, Terminated):  # torchrun stops the others when one rank fails
        what += " (torchrun stops every rank when one fails: another rank's error may be above)"
        line = line.removesuffix(": the same command starts it")  # not after an error
    if not quiet:  # under torchrun every rank gets the signal; one says it
        sys.stderr.write(f"declora: {what}; {line}\n")  # one write, as console.say_error's
        sys.stderr.flush()
    if isinstance(stop, JobStopped):  # leave without waiting on the process group's peers (as run_setup.die)
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
