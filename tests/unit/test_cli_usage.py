"""The command line, its --help and the README's usage block name the same commands, and every usage
line of the README parses."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import declora.cli
from declora.cli import build_parser
from declora.console import RoundsBar

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def _usage_lines() -> list[str]:
    """The ``declora ...`` lines of the first code block under "## Usage", comments dropped."""
    section = README.read_text().split("\n## Usage\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("declora ")]


def _subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_readme_usage_names_exactly_the_cli_commands():
    named = {line.split()[1] for line in _usage_lines()}
    assert named == _subcommands()


def test_help_and_module_doc_name_exactly_the_cli_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    listed = re.search(r"\{([a-z,]+)\}", capsys.readouterr().out).group(1)
    assert set(listed.split(",")) == _subcommands()
    in_doc = set(re.search(r"``declora ([a-z |]+)``", declora.cli.__doc__).group(1).split(" | "))
    assert in_doc == _subcommands()


@pytest.mark.parametrize("line", _usage_lines())
def test_every_readme_usage_line_parses(line):
    """Optional parts ([...]) dropped, placeholders kept: argparse accepts the line's shape."""
    words = re.sub(r"\[[^\]]*\]", " ", line).split()[1:]
    args = build_parser().parse_args(words)
    assert args.command == words[0]


@pytest.mark.parametrize("line", declora.cli.EXAMPLES.splitlines()[1:])
def test_every_help_example_parses(line):
    """The examples at the end of --help: the command part (up to the two-space gap) parses."""
    words = re.sub(r"\[[^\]]*\]", " ", line.strip().split("  ")[0]).split()[1:]
    assert build_parser().parse_args(words).command == words[0]


def test_the_repository_documents_itself():
    """No file points at documents outside the repository (the algorithms are in docs/algorithms.md)."""
    root = README.parent
    outside = ("ALGORITHMS" + ".md", "../" + "shared")
    files = [root / "README.md", root / "Makefile", root / "pyproject.toml"]
    for folder in ("src", "docs", "configs", "tests", "benchmarks"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".txt"}]
    hits = [f"{p}: {s}" for p in files for s in outside if s in p.read_text(errors="ignore")]
    assert hits == []
    assert (root / "docs" / "algorithms.md").is_file()


def test_overrides_may_follow_a_flag():
    from declora.cli import parse_cli

    args = parse_cli(["run", "run_dir=/tmp/x", "--overwrite", "rounds=2", "train.lr=0.01"])
    assert args.overwrite and args.config is None
    assert args.overrides == ["run_dir=/tmp/x", "rounds=2", "train.lr=0.01"]
    args = parse_cli(["compare", "g.yaml", "--out", "o", "rounds=1"])
    assert (args.grid, args.out, args.overrides) == ("g.yaml", "o", ["rounds=1"])
    with pytest.raises(SystemExit):  # an unknown flag is still an error, not an override
        parse_cli(["run", "rounds=1", "--overwrite", "rounds=2", "--oops"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["run", "--resume", "a", "--resume", "b"],
            "--resume is given more than once",
        ),  # not the last silently
        (["report", "r1", "r2", "--out", "x", "--out=y"], "--out is given more than once"),
        (["run", "-v", "rounds=1"], "-v goes before the command"),
    ],
)
def test_a_flag_given_twice_or_misplaced_is_named(argv, says, capsys):
    from declora.cli import parse_cli

    with pytest.raises(SystemExit) as exit_:
        parse_cli(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_the_progress_bar_rate_counts_the_rounds_of_this_call_over_its_whole_time(capsys):
    """The bar is drawn at the first round (a failed start shows none) yet times from the start of the
    call, and a resume's earlier rounds do not count: 2 rounds after round 3 in 10 s is 0.2 round/s."""
    bar = RoundsBar(total=6)
    bar.lines = False  # the bar a terminal shows
    bar.began -= 10.0  # the call started 10 s ago
    record = {"train_loss": 0.5, "bytes_total": 0, "tokens_per_s": 1.0}
    bar.on_round({"round": 4, **record})  # resumed after round 3
    bar.on_round({"round": 5, **record})
    shown = bar.bar.format_dict
    assert shown["initial"] == 3 and shown["n"] == 5 and shown["elapsed"] >= 10.0
    assert 0.15 < (shown["n"] - shown["initial"]) / shown["elapsed"] <= 0.2
    bar.close()


def test_a_grids_progress_bar_shows_the_metric_the_grid_ranks():
    bar = RoundsBar(total=2, metric="acc_node_mean")
    bar.lines = False  # the bar a terminal shows
    record = {"round": 1, "train_loss": 0.5, "bytes_total": 0, "tokens_per_s": 1.0}
    bar.on_round({**record, "acc_avg_factors": 0.656, "acc_node_mean": 0.516})
    assert "acc=65.6" in bar.bar.postfix and "acc_node_mean=51.6" in bar.bar.postfix
    bar.close()


def test_progress_in_a_log_file_is_one_plain_line_per_round(capsys):
    # stderr is not a terminal here (as in a batch job's log): no carriage-return redraws of a bar

    bar = RoundsBar(2)
    for t in (1, 2):
        bar.on_round({"round": t, "train_loss": 0.5, "bytes_total": 2e6, "tokens_per_s": 100.0})
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and [x.split(" (")[0] for x in err.splitlines()] == [
        "round 1/2: loss 0.500, MB 2.0, tok/s 100",
        "round 2/2: loss 0.500, MB 2.0, tok/s 100",
    ]


def test_each_progress_line_is_written_whole(monkeypatch):
    """A round's line and its newline in one write: with print()'s two writes, a stop signal between
    them glued the stop's one line ("declora: interrupted; ...") to the end of the round's line."""
    import io

    writes: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr("sys.stderr", Recording())
    bar = RoundsBar(2)
    for t in (1, 2):
        bar.on_round({"round": t, "train_loss": 0.5, "bytes_total": 2e6, "tokens_per_s": 100.0})
    bar.close()
    assert len(writes) == 2 and all(w.startswith("round ") and w.endswith(" s)\n") for w in writes), writes


def test_a_resumed_runs_progress_lines_go_on_with_the_runs_clock(capsys):
    # after a resume the seconds go on from the run's wall_s (as metrics.jsonl logs it), not from 0

    bar = RoundsBar(6)
    bar.on_round({"round": 4, "train_loss": 0.5, "bytes_total": 0, "tokens_per_s": 1.0, "wall_s": 123.4})
    bar.close()
    assert capsys.readouterr().err.strip().endswith("(123 s)")


def test_compare_usage_names_its_grid(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    out = capsys.readouterr().out
    assert "usage: declora compare [-h] [--out OUT] [--jobs J] [--dry-run] GRID [key=value ...]" in out
    assert "--jobs J " in out and "cells run at once" in out
    assert "--cell" not in out  # the flag of a cell's own process (declora.compare_jobs), not a user's
