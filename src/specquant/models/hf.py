"""A Hugging Face causal-LM folder (``config.json`` + ``*.safetensors`` + tokenizer files) as a
model entry: what ``specquant quantize ./my-model`` and ``specquant eval`` use.

Nothing is downloaded (``local_files_only``) and no code from the folder runs
(``trust_remote_code=False``): the architecture is one of ``transformers``' own classes, chosen
by the folder's ``config.json``.  Calibration windows come from the WikiText-2 validation text,
perplexity from the test text, both tokenized by the folder's tokenizer without special tokens
(the protocol of :mod:`specquant.eval.perplexity`).
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

from specquant.eval.perplexity import calibration_windows
from specquant.io.files import read_json
from specquant.models import data as _data
from specquant.models.zoo import DataDir, ZooEntry

MAX_DEFAULT_SEQ_LEN = 2048  # default window: the model's context, at most this


def is_hf_folder(path) -> bool:
    """Whether ``path`` is a Hugging Face model folder: its ``config.json`` is a JSON object with a
    ``model_type`` (a specquant run folder's config.json has none)."""
    p = Path(path).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        cfg = read_json(p / "config.json")
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and isinstance(cfg.get("model_type"), str)
            and "run_id" not in cfg and "command" not in cfg)


def _config(folder: Path):
    from transformers import AutoConfig  # slow to import: only language models need it

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(folder)!r}: cannot read its config.json as a transformers config: {first}") from None


def _check_causal_lm(folder: Path, config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{str(folder)!r}: model_type {config.model_type!r} is not a causal LM that transformers "
                         "knows (custom code is not run)")


def build_from_folder(folder) -> nn.Module:
    """The folder's architecture with fresh weights (float32, eval mode): transformers' own class."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder).expanduser()
    config = _config(folder)
    _check_causal_lm(folder, config)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32).eval()


def load_from_folder(folder) -> nn.Module:
    """The folder's trained model in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder).expanduser()
    config = _config(folder)
    _check_causal_lm(folder, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(folder)!r}: cannot load its weights: {first}") from None
    return model.eval()


def tokenizer_of(folder):
    """The folder's tokenizer (``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(folder)!r}: no usable tokenizer files ({first})") from None


def _encode(folder: Path, text: str) -> torch.Tensor:
    tok = tokenizer_of(folder)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (T,)


def _calib(folder: Path, default_len: int, n: int, seed: int = 0, data_dir: DataDir = None,
           seq_len: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of the WikiText-2 validation text at seeded offsets."""
    return calibration_windows(_encode(folder, _data.load_wikitext("valid", data_dir)), n, seq_len or default_len, seed)


def _test(folder: Path, data_dir: DataDir = None) -> tuple[torch.Tensor, None]:
    """The WikiText-2 raw test text as one token stream; no labels."""
    return _encode(folder, _data.load_wikitext("test", data_dir)), None


def folder_entry(folder) -> ZooEntry:
    """A model entry (kind "lm", not registered in the zoo) for a Hugging Face causal-LM folder."""
    folder = Path(folder).expanduser().resolve()
    if not is_hf_folder(folder):
        raise ValueError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    config = _config(folder)
    _check_causal_lm(folder, config)
    context = int(getattr(config, "max_position_embeddings", None) or MAX_DEFAULT_SEQ_LEN)
    seq_len = min(context, MAX_DEFAULT_SEQ_LEN)
    return ZooEntry(
        id=str(folder), kind="lm", description=f"Hugging Face {config.model_type} causal LM from {folder}",
        build=functools.partial(build_from_folder, folder),
        load=lambda data_dir=None: load_from_folder(folder),
        calib=functools.partial(_calib, folder, seq_len),
        test=functools.partial(_test, folder),
        input_shape=(seq_len,),
        extra={"context": context, "seq_len": seq_len, "tokenizer": functools.partial(tokenizer_of, folder),
               "hf_folder": str(folder)},
    )


# ---------------------------------------------------------------------------------------------
# Out-of-core: the architecture without weights, and the weights read lazily from the shards
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def empty_parameters():
    """Modules built inside get their parameters on the meta device (no memory, no
    initialisation cost); buffers stay real (rotary frequencies are computed, not stored)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_empty(folder) -> nn.Module:
    """The folder's architecture in eval mode with every parameter on the meta device (float32):
    weights come later from :class:`ShardReader`."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder).expanduser()
    config = _config(folder)
    _check_causal_lm(folder, config)
    with empty_parameters():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    return model.eval()


class ShardReader:
    """The tensors of a folder's ``*.safetensors`` shards, read one at a time on request.

    ``model.safetensors.index.json`` (its ``weight_map``), when present, says which shard holds
    which tensor; otherwise every ``*.safetensors`` file of the folder is listed once.  Tensors
    come back as float32 copies that own their memory (nothing stays mapped)."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        index = self.folder / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.is_file():
            try:
                wmap = read_json(index).get("weight_map")
                if not isinstance(wmap, dict):
                    raise ValueError("no weight_map")
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"{str(index)!r}: not a safetensors index ({e})") from None
            for key, shard in wmap.items():
                path = self.folder / str(shard)
                if path.parent != self.folder or not path.is_file():
                    raise ValueError(f"{str(index)!r}: tensor {key!r} is in shard {shard!r}, which is not a file "
                                     "of the folder")
                self.where[key] = path
        else:
            from safetensors import safe_open

            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    self.where.update({k: path for k in f.keys()})
        if not self.where:
            raise ValueError(f"{str(self.folder)!r}: no *.safetensors weights (out-of-core reading needs safetensors)")

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as float32 (a copy owning its memory)."""
        from safetensors import safe_open

        if key not in self.where:
            raise ValueError(f"{str(self.folder)!r}: no tensor {key!r} in its safetensors files")
        with safe_open(str(self.where[key]), framework="pt", device="cpu") as f:
            t = f.get_tensor(key)
        return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()
