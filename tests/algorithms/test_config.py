"""Settings every config shares: typed granularity and the per-module map with its one resolver."""
import fnmatch
import itertools
import json

import pytest

from specquant.algorithms import GPFQConfig, ModuleSettings, ResolvedSettings, RTNConfig, SPFQConfig
from specquant.core.grid import Granularity

CHANNEL = Granularity("channel")


def test_granularity_is_parsed_once_into_a_granularity():
    assert RTNConfig().granularity == CHANNEL
    assert RTNConfig(granularity="tensor").granularity == Granularity("tensor")
    assert SPFQConfig(granularity="group:16").granularity == Granularity("group", group_size=16)
    assert RTNConfig(granularity=Granularity("group", group_size=4)).granularity.group_size == 4
    assert ModuleSettings(granularity="group:8").granularity == Granularity("group", group_size=8)
    for bad, msg in (("row", "unknown granularity 'row'"), ("group:x", "bad group granularity"),
                     ("group:0", "group size must be a positive integer")):
        with pytest.raises(ValueError, match=msg):
            RTNConfig(granularity=bad)
        with pytest.raises(ValueError, match=msg):
            ModuleSettings(granularity=bad)


def test_settings_for_exact_name_first_then_the_first_matching_pattern():
    cfg = GPFQConfig(bits=3, granularity="group:4", modules={
        "layer1.*": ModuleSettings(bits=2),
        "layer1.0.conv1": ModuleSettings(bits=8),  # exact: wins over the earlier pattern
        "layer*": ModuleSettings(granularity="tensor"),  # later pattern: only where "layer1.*" does not match
        "fc": ModuleSettings(skip=True),
    })
    g4 = Granularity("group", group_size=4)
    assert cfg.settings_for("layer1.0.conv1") == ResolvedSettings(8, False, None, g4)
    assert cfg.settings_for("layer1.1.conv2") == ResolvedSettings(2, False, None, g4)  # first pattern only
    assert cfg.settings_for("layer2.0.conv1") == ResolvedSettings(3, False, None, Granularity("tensor"))
    assert cfg.settings_for("fc").skip and not cfg.settings_for("fc2").skip  # fc2: no entry matches
    assert cfg.settings_for("stem") == ResolvedSettings(3, False, None, g4)  # no entry: the config's own
    rows = RTNConfig(modules={"mid": ModuleSettings(row_bits=[2, 3, 2])}).settings_for("mid")
    assert rows.row_bits == (2, 3, 2) and rows.bits == 4
    with pytest.raises(ValueError, match="layer 'mid': per-row widths need granularity 'channel', not 'tensor'"):
        RTNConfig(granularity="tensor", modules={"mid": ModuleSettings(row_bits=(2, 3))}).settings_for("mid")


def test_module_settings_are_checked_when_built():
    with pytest.raises(ValueError, match="ModuleSettings.bits must be an integer in 1..8, got 9"):
        ModuleSettings(bits=9)
    with pytest.raises(ValueError, match="row width must be an integer in 1..8, got 0"):
        ModuleSettings(row_bits=(2, 0))
    with pytest.raises(ValueError, match="one width per output row"):
        ModuleSettings(row_bits=())
    with pytest.raises(ValueError, match="a skipped module takes no other settings"):
        ModuleSettings(skip=True, bits=4)
    with pytest.raises(ValueError, match=r"modules\['fc'\] must be a ModuleSettings, got int"):
        RTNConfig(modules={"fc": 8})
    with pytest.raises(ValueError, match="config.bits must be an integer in 1..8"):
        RTNConfig(bits=0)


def test_to_dict_is_strict_json():
    cfg = GPFQConfig(bits=3, granularity="group:4", modules={"fc*": ModuleSettings(bits=8, granularity="tensor"),
                                                             "head": ModuleSettings(skip=True),
                                                             "mid": ModuleSettings(row_bits=(2, 3))})
    d = json.loads(json.dumps(cfg.to_dict(), allow_nan=False))
    assert d["method"] == "gpfq" and d["granularity"] == "group:4" and d["search"] == [0.8, 0.9, 1.1, 1.25]
    assert d["modules"] == {"fc*": {"bits": 8, "granularity": "tensor"}, "head": {"skip": True},
                            "mid": {"row_bits": [2, 3]}}


def _old_rules(skip, overrides, row_bits, default_bits, name):
    """How the three old fields resolved a module (copied from before the map existed)."""
    if any(name == p or fnmatch.fnmatchcase(name, p) for p in skip):
        return ("skip",)
    if name in row_bits:
        return ("rows", tuple(row_bits[name]))
    if name in overrides:
        return ("bits", overrides[name])
    for p, b in overrides.items():
        if fnmatch.fnmatchcase(name, p):
            return ("bits", b)
    return ("bits", default_bits)


def _new_rules(cfg, name):
    s = cfg.settings_for(name)
    return ("skip",) if s.skip else ("rows", s.row_bits) if s.row_bits else ("bits", s.bits)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_keywords_resolve_every_module_as_before():
    names = ["a", "a.b", "a.c", "b", "b.a", "fc", "fc1"]
    skips = [(), ("a.*",), ("fc",), ("b*", "a.b")]
    overrides = [{}, {"a.b": 8, "a.*": 3}, {"fc": 2, "*": 6}, {"b.a": 5, "fc*": 7}]
    rows = [{}, {"a.b": (2, 3)}, {"fc": (4, 2), "b": (3,)}]
    for sk, ov, rb in itertools.product(skips, overrides, rows):
        cfg = RTNConfig(bits=4, skip=sk, overrides=ov, row_bits=rb)
        for n in names:
            assert _new_rules(cfg, n) == _old_rules(sk, ov, rb, 4, n), (sk, ov, rb, n)
