"""What every method shares: the statistics the engine hands an algorithm, the settings every
config has (with its per-module map), and the registry of methods.

A method is a pure function ``quantize_weight(W, stats, config, ctx) -> QuantizedWeight`` and a
config dataclass (a ``QuantConfig`` subclass whose class attribute ``method`` is its name).  Its
module registers the pair when imported::

    register_method("rtn", RTNConfig, quantize_weight, "round-to-nearest on a calibrated grid")

``specquant.algorithms`` imports the built-in methods, so importing specquant registers them;
a method defined elsewhere registers the same way (``tests/algorithms/test_registry.py`` adds a
toy method from a test file and runs it through ``specquant.quantize``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specquant.algorithms.common import target_energy
from specquant.core.actquant import ACT_GRANULARITIES, check_act_calibrator, check_act_grid
from specquant.core.grid import FP8_FORMATS, Granularity, GridSpec, check_bits, scale_dtype_name

if TYPE_CHECKING:
    from specquant.core.qweight import QuantizedWeight


@dataclass
class LayerStats:
    """Streaming input statistics of one layer, in the covariance form.

    X is the (m, N0) matrix of the layer's inputs in the float model and X̃ the matching
    inputs in the partly quantized model (rows are samples or conv patches).  Only N0×N0
    products are kept, so memory does not grow with the number of calibration samples.
    """

    H: torch.Tensor  # (N0, N0) float64: X̃ᵀX̃
    G: torch.Tensor  # (N0, N0) float64: X̃ᵀX (row index follows X̃, column index follows X)
    F: torch.Tensor | None  # (N0, N0) float64: XᵀX, or None when only ``energy`` was recorded
    n_rows: int  # m, rows (samples × positions) accumulated
    mean_x: torch.Tensor  # (N0,) float64: column means of X
    mean_xt: torch.Tensor  # (N0,) float64: column means of X̃
    energy: torch.Tensor | None = None  # (out,) float64: ‖X w_i‖² for the layer's own weights W

    def target_energy(self, W: torch.Tensor) -> torch.Tensor:
        """‖X w_i‖² per row of ``W`` (out, N0): from F when kept, else the recorded energies
        (which belong to the layer's own weights; K stacked copies of them are accepted)."""
        if self.F is not None:
            return target_energy(W, self.F)
        if self.energy is None:
            raise ValueError("these statistics hold neither F = XᵀX nor output energies")
        k, r = divmod(W.shape[0], self.energy.numel())
        if r or k == 0:
            raise ValueError(f"output energies were recorded for {self.energy.numel()} rows, "
                             f"not {W.shape[0]}; collect F (keep_f=True) for other weights")
        return self.energy.repeat(k)

    @property
    def dim(self) -> int:
        return self.H.shape[0]


ACT_SOURCES = ("quantized", "float")  # QuantConfig.act_source: calibrate input quantizers on X̃ or on X
WEIGHT_GRIDS = ("int", *FP8_FORMATS)  # QuantConfig.grid: the integer grids, or an 8-bit float grid


# --------------------------------------------------------------------------- per-module settings


@dataclass(frozen=True)
class ModuleSettings:
    """Settings for the modules one key of ``QuantConfig.modules`` names.

    A field left at None takes the config's own value (``config.bits``, ``config.granularity``).
    """

    bits: int | None = None  # storage bits per code, 1..8
    skip: bool = False  # leave the module in float (then no other setting may be given)
    row_bits: tuple[int, ...] | None = None  # width of output row 0, row 1, …: mixed rows (granularity "channel")
    granularity: Granularity | None = None  # "channel", "tensor", "group:G" or a Granularity

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_bits(self.bits, "ModuleSettings.bits")
        if not isinstance(self.skip, bool):
            raise ValueError(f"ModuleSettings.skip must be True or False, got {self.skip!r}")
        if self.row_bits is not None:
            if isinstance(self.row_bits, (str, bytes)) or not hasattr(self.row_bits, "__iter__"):
                raise ValueError(f"ModuleSettings.row_bits must be a sequence of widths, got {self.row_bits!r}")
            widths = tuple(self.row_bits)
            if not widths:
                raise ValueError("ModuleSettings.row_bits needs one width per output row, got none")
            for b in widths:
                check_bits(b, "row width")
            object.__setattr__(self, "row_bits", widths)
        if self.granularity is not None:
            object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        if self.skip and (self.bits is not None or self.row_bits is not None or self.granularity is not None):
            raise ValueError("a skipped module takes no other settings (bits, row_bits, granularity)")

    def to_dict(self) -> dict:
        """The fields that are set (granularity as its label): strict-JSON-safe."""
        d = {}
        if self.bits is not None:
            d["bits"] = self.bits
        if self.skip:
            d["skip"] = True
        if self.row_bits is not None:
            d["row_bits"] = list(self.row_bits)
        if self.granularity is not None:
            d["granularity"] = self.granularity.label()
        return d


@dataclass(frozen=True)
class ResolvedSettings:
    """What applies to one module: its ``modules`` entry, completed by the config's defaults."""

    bits: int  # storage bits per code (rows of mixed width: see row_bits)
    skip: bool  # left in float
    row_bits: tuple[int, ...] | None  # per-row widths, or None for one width
    granularity: Granularity  # scale granularity


def _check_modules(modules) -> dict[str, ModuleSettings]:
    if not isinstance(modules, Mapping):
        raise ValueError(f"modules must be a dict {{module name or pattern: ModuleSettings}}, got {modules!r}")
    out = {}
    for key, s in modules.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"modules keys must be module names or fnmatch patterns, got {key!r}")
        if not isinstance(s, ModuleSettings):
            raise ValueError(f"modules[{key!r}] must be a ModuleSettings, got {type(s).__name__}")
        out[key] = s
    return out


def _plain_name(key: str) -> bool:
    return not any(c in key for c in "*?[")


def _legacy_modules(skip, overrides, row_bits) -> dict[str, ModuleSettings]:
    """The ``modules`` map that resolves every name as the old ``skip`` (patterns left in float,
    winning over everything), ``overrides`` (pattern → bits, exact name first) and ``row_bits``
    (exact name → widths) did."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())
    overrides = dict(overrides or {})

    def skipped(name: str) -> bool:
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in skip)

    out: dict[str, ModuleSettings] = {}
    for name, widths in dict(row_bits or {}).items():
        out[name] = ModuleSettings(skip=True) if skipped(name) else ModuleSettings(row_bits=widths)
    for p in skip:  # patterns: before every bits entry, so that a skip wins
        out.setdefault(p, ModuleSettings(skip=True))
    for p, b in overrides.items():  # an exact name is found first anyway: it carries its skip
        out.setdefault(p, ModuleSettings(skip=True) if _plain_name(p) and skipped(p) else ModuleSettings(bits=b))
    return out


class _ConfigType(type):
    """Metaclass of the configs.  ``SomeConfig(skip=…, overrides=…, row_bits=…)``, the keywords
    used before the per-module map existed, still builds the equivalent ``modules`` map (with a
    DeprecationWarning); they are not fields."""

    def __call__(cls, *args, skip=None, overrides=None, row_bits=None, **kwargs):
        if skip is None and overrides is None and row_bits is None:
            return super().__call__(*args, **kwargs)
        warnings.warn("the config keywords skip=, overrides= and row_bits= are deprecated; use "
                      "modules={name or pattern: ModuleSettings(...)}", DeprecationWarning, stacklevel=2)
        if kwargs.get("modules"):
            raise ValueError("give modules= or the old skip=/overrides=/row_bits= keywords, not both")
        kwargs["modules"] = _legacy_modules(skip, overrides, row_bits)
        return super().__call__(*args, **kwargs)


@dataclass
class QuantConfig(metaclass=_ConfigType):
    """Settings shared by every method; each method's config extends it.

    ``modules`` maps a module name or an fnmatch pattern to ``ModuleSettings``: mixed precision,
    modules left in float, per-row widths, another granularity.  Which entry applies to a module
    (:meth:`settings_for`): the entry whose key is the module's name; otherwise the first entry,
    in the map's order, whose key matches the name as a pattern; otherwise none.  Only that one
    entry applies, and the fields it leaves at None come from the config (``bits``,
    ``granularity``).  Example::

        GPFQConfig(bits=3, modules={"fc": ModuleSettings(bits=8), "layer1.*": ModuleSettings(skip=True)})
    """

    bits: int = 4  # storage bits per weight code, 1..8 (codes always fit in this many bits)
    granularity: Granularity = Granularity("channel")  # "channel" (per output channel), "tensor", "group:G"
    symmetric: bool = True  # narrow symmetric grid (2^b − 1 levels; binary at 1 bit) or asymmetric
    seed: int = 0  # seed for every random choice (stochastic rounding, patch subsampling)
    bias_correction: bool = False  # shift each output channel's bias to match the float mean output
    scale_dtype: str = "float32"  # scales as stored and used: "float32", "float16", "float16-q4_1" (7 bits)
    modules: dict[str, ModuleSettings] = field(default_factory=dict)  # {module name or pattern: settings}
    awq: bool = False  # AWQ pre-step (engine/awq.py): input-channel scales folded in before rounding; needs data
    awq_grid: int = 20  # AWQ: exponents α searched, 0, 1/n, …, (n−1)/n (used only with awq=True)
    act_bits: int | None = None  # static per-tensor asymmetric input quantizer of every quantized layer (1..8
    #                              bits), calibrated by the engine; None keeps activations in float; needs data
    act_calibrator: str = "mse"  # its range: mse, minmax, percentile, kl, aciq (= aciq-laplace), aciq-gauss
    act_source: str = "quantized"  # the inputs it is calibrated on: "quantized" (X̃, what the layer will see:
    #                                earlier layers quantized) or "float" (X, the float model's)
    grid: str = "int"  # weight grid: "int" (narrow symmetric / asymmetric by `symmetric`) or "fp8-e4m3" /
    #                    "fp8-e5m2" (8-bit float codes scaled per block; bits must be 8, symmetric True)
    act_grid: str = "int"  # input quantizers' grid: "int" (asymmetric uniform) or "fp8-e4m3" / "fp8-e5m2"
    act_granularity: str = "tensor"  # "tensor": one static calibrated range per layer input; "token": each
    #                                  token's (row's) own asymmetric range at run time (Linear inputs, LMs;
    #                                  nothing calibrated, act_calibrator and act_source unused)
    smoothquant: float | None = None  # SmoothQuant α in [0, 1] (engine/smoothquant.py): per-input-channel scales
    #                                   max|X_j|^α / max|W_j|^(1−α) folded in before rounding; None: off; needs data

    method = "base"  # the method's name (class attribute, not a field; the registry checks it)
    needs_data = False  # whether the engine must stream calibration statistics

    def __post_init__(self) -> None:
        check_bits(self.bits, "config.bits")
        self.granularity = Granularity.parse(self.granularity)  # a string is accepted for convenience
        try:
            self.scale_dtype = scale_dtype_name(self.scale_dtype)
        except ValueError:
            raise ValueError(f"config.scale_dtype must be 'float32' ('fp32'), 'float16' ('fp16') or 'float16-q4_1' "
                             f"(float16 with 7 significant bits, for GGUF Q4_1), got {self.scale_dtype!r}") from None
        self.modules = _check_modules(self.modules)
        if not isinstance(self.awq, bool):
            raise ValueError(f"config.awq must be True or False, got {self.awq!r}")
        if isinstance(self.awq_grid, bool) or not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise ValueError(f"config.awq_grid must be a positive integer, got {self.awq_grid!r}")
        if self.awq:
            self.needs_data = True  # the AWQ search reads the activations (an instance value over the class's)
        if self.act_bits is not None:
            check_bits(self.act_bits, "config.act_bits")
            self.needs_data = True  # activation ranges are calibrated on the data
        try:
            check_act_calibrator(self.act_calibrator)
        except ValueError as e:
            raise ValueError(f"config.act_calibrator: {e}") from None
        if self.act_source not in ACT_SOURCES:
            raise ValueError(f"config.act_source must be one of {', '.join(ACT_SOURCES)}, got {self.act_source!r}")
        if self.grid not in WEIGHT_GRIDS:
            raise ValueError(f"config.grid must be one of {', '.join(WEIGHT_GRIDS)}, got {self.grid!r}")
        if self.grid != "int":
            if self.bits != 8:
                raise ValueError(f"config.grid {self.grid} stores 8-bit codes; it needs bits=8, got bits={self.bits}")
            if not self.symmetric:
                raise ValueError(f"config.grid {self.grid} is symmetric (zero point 0); it needs symmetric=True")
        try:
            check_act_grid(self.act_grid, self.act_bits)
        except ValueError as e:
            raise ValueError(f"config.act_grid: {e}") from None
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"config.act_granularity must be one of {', '.join(ACT_GRANULARITIES)}, "
                             f"got {self.act_granularity!r}")
        if self.smoothquant is not None:
            a = self.smoothquant
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
                raise ValueError(f"config.smoothquant (SmoothQuant α) must be a number in [0, 1], got {a!r}")
            self.smoothquant = float(a)
            self.needs_data = True  # the migration reads max |x| per channel on the calibration data
        if self.act_granularity == "token" and self.act_grid != "int":
            raise ValueError(f"config.act_grid {self.act_grid} is a per-tensor calibrated grid; per-token "
                             "activations (act_granularity='token') are integer")

    def grid_spec(self, bits: int | None = None) -> GridSpec:
        """The weight grid of a layer with ``bits`` (default ``self.bits``): ``GridSpec.default(bits,
        symmetric)``, or the FP8 grid of ``grid`` (which needs 8 bits: a one-line error otherwise)."""
        bits = self.bits if bits is None else bits
        if self.grid == "int":
            return GridSpec.default(bits, self.symmetric)
        if bits != 8:
            raise ValueError(f"grid {self.grid} stores 8-bit codes, not {bits}-bit ones")
        return GridSpec(8, self.grid)

    def settings_for(self, name: str) -> ResolvedSettings:
        """The settings of module ``name`` (see the class docstring for which entry applies)."""
        entry = self.modules.get(name)
        if entry is None:
            entry = next((s for key, s in self.modules.items() if fnmatch.fnmatchcase(name, key)), None)
        if entry is None:
            return ResolvedSettings(bits=self.bits, skip=False, row_bits=None, granularity=self.granularity)
        gran = entry.granularity if entry.granularity is not None else self.granularity
        if entry.row_bits is not None and gran.kind != "channel":
            raise ValueError(f"layer '{name}': per-row widths need granularity 'channel', not {gran.label()!r}")
        return ResolvedSettings(bits=entry.bits if entry.bits is not None else self.bits, skip=entry.skip,
                                row_bits=entry.row_bits, granularity=gran)

    def to_dict(self) -> dict:
        """Every field plus ``method``, strict-JSON-safe (granularities as their labels).

        ``awq`` and ``awq_grid`` appear only when AWQ is on, ``act_*`` only with activation
        quantization (``act_bits``) and ``smoothquant`` only when set, so the dicts of configs
        without them (in reports and run folders) are what they were before AWQ and activation quantization existed."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.awq:
            del d["awq"], d["awq_grid"]
        if self.act_bits is None:
            del d["act_bits"], d["act_calibrator"], d["act_source"], d["act_granularity"]
        if d.get("act_grid") == "int" or self.act_bits is None:
            del d["act_grid"]
        if self.grid == "int":
            del d["grid"]
        if self.smoothquant is None:
            del d["smoothquant"]
        d["granularity"] = self.granularity.label()
        d["modules"] = {k: s.to_dict() for k, s in self.modules.items()}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["method"] = self.method
        return d


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class QuantContext:
    """What the engine tells an algorithm about one call besides the weights, statistics and config."""

    layer: str  # module name (for messages)
    seed: int  # seed of this call's random choices (the engine passes config.seed)


def context(ctx: QuantContext | None, config: QuantConfig) -> QuantContext:
    """``ctx``, or for a call outside the engine (``ctx=None``) layer "layer" and ``config.seed``."""
    return ctx if ctx is not None else QuantContext(layer="layer", seed=config.seed)


QuantizeWeight = Callable[[torch.Tensor, "LayerStats | None", QuantConfig, "QuantContext | None"], "QuantizedWeight"]


@dataclass(frozen=True)
class Method:
    """A registered method."""

    name: str  # what configs (``config.method``), the CLI and reports call it
    config_type: type[QuantConfig]  # its config dataclass
    quantize_weight: QuantizeWeight  # (W (out, N0), stats or None, config, ctx) -> QuantizedWeight; pure
    summary: str  # one line for help text


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_type: type[QuantConfig], quantize_weight: QuantizeWeight,
                    summary: str) -> Method:
    """Register a method under ``name`` (``config_type.method`` must be ``name``); returns it.

    Registering the same name again is an error, unless it is the same function and config
    type (a module imported twice)."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"a method name must be a non-empty word, got {name!r}")
    if not (isinstance(config_type, type) and issubclass(config_type, QuantConfig)
            and dataclasses.is_dataclass(config_type)):
        raise ValueError(f"method {name!r}: the config type must be a QuantConfig dataclass, got {config_type!r}")
    if config_type.method != name:
        raise ValueError(f"method {name!r}: {config_type.__name__}.method is {config_type.method!r}, not {name!r}")
    try:
        inspect.signature(quantize_weight).bind(None, None, None, None)
    except (TypeError, ValueError):
        raise ValueError(f"method {name!r}: quantize_weight must take (W, stats, config, ctx)") from None
    if not isinstance(summary, str) or not summary.strip() or "\n" in summary:
        raise ValueError(f"method {name!r}: the summary must be one non-empty line")
    method = Method(name, config_type, quantize_weight, summary.strip())
    old = _METHODS.get(name)
    if old is not None:
        if old != method:
            raise ValueError(f"method {name!r} is already registered (by {old.config_type.__module__})")
        return old
    _METHODS[name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Registered names in registration order: rtn, gpfq, spfq, gptq, qronos, frame, awq, then any added later."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; a one-line ValueError listing the allowed names otherwise."""
    method = _METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(_METHODS)}")
    return method


AWQ_PREFIX = "awq+"  # "awq+NAME": method NAME with the AWQ pre-step (config.awq = True)


def split_method(name: str) -> tuple[str, bool]:
    """("NAME", True) for "awq+NAME", else (name, False)."""
    if isinstance(name, str) and name.startswith(AWQ_PREFIX):
        return name[len(AWQ_PREFIX):], True
    return name, False


def method_choices() -> tuple[str, ...]:
    """Every name ``make_config`` takes: the registered methods, then "awq+NAME" for each of
    them but "awq" itself (method NAME with AWQ scales folded in first)."""
    names = method_names()
    return names + tuple(AWQ_PREFIX + n for n in names if n != "awq")


def make_config(method: str, **settings) -> QuantConfig:
    """The config of ``method`` with ``settings`` (its field names; defaults for the rest).

    ``method`` may be "awq+NAME": method NAME with ``awq=True`` (AWQ scales, then NAME's
    rounding).  An unknown method or setting is a one-line ValueError naming it; a bad value
    raises the config's own error."""
    name, awq = split_method(method)
    if awq:
        if name == "awq":
            raise ValueError("'awq+awq' is not a method; method 'awq' already is AWQ then RTN")
        if settings.get("awq", True) is not True:
            raise ValueError(f"method {method!r} turns AWQ on; it takes no awq={settings['awq']!r}")
        get_method(name)
        settings = {**settings, "awq": True}
        method = name
    cls = get_method(method).config_type
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in settings:
        if key not in allowed:
            raise ValueError(f"unknown setting {key!r} for method {method!r}; allowed: {', '.join(allowed)}")
    return cls(**settings)
