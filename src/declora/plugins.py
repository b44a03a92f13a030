"""A user's own algorithms, by name, in every command: ``plugins: [my_package.algos, path/to/algo.py]``.

Each entry is imported before the config is checked (a module on the Python path, or a ``.py`` file),
and the module registers its algorithms with ``declora.algorithms.register``. The run's config.yaml keeps
the list, so a resume, a ``declora compare`` cell and every torchrun process import the same code. A
``.py`` file edited within one Python session is executed again when next named, so that a run runs the
file it records. A script that calls declora from Python registers directly and needs no ``plugins``
entry.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import logging
import sys
from pathlib import Path
from types import ModuleType

from declora.algorithms import ALGORITHMS, SHIPPED, unregister_module
from declora.config import ConfigError

# Each file's module and the hash of the bytes it was executed from: a file is executed once per process
# however often it is named, and again when its content has changed (edited within one Python session), so
# that a run runs the code its record names (declora.inputs fingerprints the file as it is now).
log = logging.getLogger(__name__)
_FILES: dict[Path, tuple[ModuleType, str]] = {}
_CHECKED: set[str] = set()  # entries already looked at for their registrations (once per process)
_SOURCES: dict[str, str] = {}  # module name -> the plugins entry that imported it
_COUNT = itertools.count()  # module names stay unique when a changed file is executed again


def _import_file(path: Path) -> ModuleType:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"plugins: {str(path)!r} is not a file (give a .py file or an importable module)")
    digest = hashlib.sha256(resolved.read_bytes()).hexdigest()
    held = _FILES.get(resolved)
    if held is not None and held[1] == digest:
        return held[0]
    # the old code's registrations make way for the new code's (which may have renamed its class)
    stale = unregister_module(held[0].__name__) if held is not None else {}
    try:
        module = _execute(path, resolved)
    except BaseException:
        ALGORITHMS.update(stale)  # a failed import leaves the registry as it was
        raise
    _FILES[resolved] = (module, digest)
    return module


def _execute(path: Path, resolved: Path) -> ModuleType:
    name = f"declora_plugin_{next(_COUNT)}_{resolved.stem}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugins: {str(path)!r} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugins(entries: tuple[str, ...]) -> None:
    """Import every entry, in order; any failure is one ConfigError naming the entry."""
    for entry in entries:
        before = set(ALGORITHMS)
        try:
            if entry.endswith(".py"):
                name = _import_file(Path(entry)).__name__
            else:
                name = importlib.import_module(entry).__name__
        except ConfigError:
            raise
        except ModuleNotFoundError as err:
            if entry == err.name or entry.startswith(f"{err.name}."):
                beside = Path(*entry.split(".")).with_suffix(".py")  # the declora command's path lacks "."
                hint = f"; there is {beside}: give plugins=[{beside}]" if beside.is_file() else ""
                raise ConfigError(
                    f"plugins: no module named {entry!r} on the Python path (give an importable module "
                    f"name or a .py file){hint}"
                ) from err
            raise ConfigError(f"plugins: importing {entry!r} failed: {err}") from err
        except (Exception, SystemExit) as err:  # the plugin's own code: say which one, and what it raised
            raise ConfigError(f"plugins: importing {entry!r} failed: {type(err).__name__}: {err}") from err
        _SOURCES[name] = entry
        if entry not in _CHECKED:
            _CHECKED.add(entry)
            if set(ALGORITHMS) == before and not _registered_by(name):
                log.warning(
                    "plugins: %r registered no algorithm (a plugin registers its algorithms when it is "
                    "imported: docs/extending.md)",
                    entry,
                )


def _registered_by(module: str) -> bool:
    """Whether ``module`` (or a module of its package) defines a registered algorithm."""
    return any(
        k not in SHIPPED and (getattr(c, "__module__", "") + ".").startswith(module + ".")
        for k, c in ALGORITHMS.items()
    )


def check_listed(algorithm: str, entries: tuple[str, ...]) -> None:
    """An algorithm that an earlier run of this process imported from a plugin is refused to a config that
    does not list that plugin: its config.yaml could be neither resumed nor run again by a new process,
    which would not know the name. (One registered by a script calling declora.algorithms.register is
    the script's own, docs/extending.md.)"""
    module = getattr(ALGORITHMS.get(algorithm), "__module__", "")
    entry = next((e for m, e in _SOURCES.items() if (module + ".").startswith(m + ".")), None)
    if entry is None or entry in entries:
        return
    listed = {Path(e).expanduser().resolve() for e in entries if e.endswith(".py")}
    if entry.endswith(".py") and Path(entry).expanduser().resolve() in listed:
        return  # the same file, named another way
    raise ConfigError(
        f"algorithm.name={algorithm!r} comes from the plugin {entry!r}, which an earlier run of this process "
        f"imported but this config does not list (plugins={list(entries)}): add it to plugins, so that the "
        "run's config.yaml can be run and resumed by a new process"
    )
