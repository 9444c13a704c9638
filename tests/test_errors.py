"""One error base (lptrain/errors.py): every library's configuration error is an
`lptrain.ConfigError` whose `path` names the field, so a caller catches one class."""

from __future__ import annotations

import pytest

import lptrain
from lptrain import lora, qat
from lptrain.config.finetune import AdaptersSection, BitSwitchSection, QATSection, library_config
from lptrain.nn import RecipeError
from lptrain.numerics import QuantSpec, SpecError
from lptrain.qat import bitswitch


@pytest.mark.parametrize(
    ("make", "cls", "path"),
    [
        (lambda: qat.QATConfig(weight_bits=1), qat.QATConfigError, "weight_bits"),
        (lambda: bitswitch.BitSwitchConfig(bits=(8, 9)), bitswitch.BitSwitchConfigError, "bits"),
        (lambda: lora.AdapterConfig(type="dora"), lora.AdapterConfigError, "type"),
        (lambda: lptrain.recipes.from_dict({"signs": 3}), RecipeError, "signs"),
        (lambda: QuantSpec(format="fp8_e4m3", scaling="nope"), SpecError, "scaling"),
    ],
)
def test_library_errors_are_config_errors_naming_their_field(make, cls, path):
    with pytest.raises(lptrain.ConfigError) as info:
        make()
    assert type(info.value) is cls and issubclass(cls, lptrain.ConfigError)
    assert info.value.path == path == info.value.field
    assert str(info.value) == f"{path}: {info.value.problem}"


@pytest.mark.parametrize(
    ("section", "lib", "key"),
    [
        (QATSection, qat.QATConfig, "qat"),
        (BitSwitchSection, bitswitch.BitSwitchConfig, "bitswitch"),
        (AdaptersSection, lora.AdapterConfig, "adapters"),
    ],
)
def test_every_library_field_is_a_yaml_key_of_the_same_name(section, lib, key):
    """The trainer's sections build the library configs by field name, never by position."""
    import dataclasses

    keys = {f.name for f in dataclasses.fields(section)}
    assert {f.name for f in dataclasses.fields(lib)} <= keys
    on = {"qat": {"method": "lsq"}, "bitswitch": {"bits": [4, 2]}, "adapters": {"type": "l4q"}}
    sec = section(**on[key])
    built = library_config(lib, sec, key, **({"bits": (4, 2)} if key == "bitswitch" else {}))
    for f in dataclasses.fields(lib):
        if f.name != "bits":
            assert getattr(built, f.name) == getattr(sec, f.name), f.name


def test_a_library_error_comes_back_under_its_yaml_section():
    with pytest.raises(lptrain.ConfigError, match=r"^qat\.weight_bits: must be in 2\.\.8, got 9"):
        library_config(qat.QATConfig, QATSection(method="lsq", weight_bits=9), "qat")
