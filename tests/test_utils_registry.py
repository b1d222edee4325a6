"""The name registry: lookup, duplicate protection and the error for unknown names."""

from __future__ import annotations

import pytest

from pretrain_det3d.utils.registry import Registry, UnknownNameError


def test_register_and_get():
    registry = Registry("widget")

    @registry.register("a")
    class A:
        pass

    assert registry.get("a") is A and "a" in registry and registry.names() == ["a"]


def test_duplicate_name_is_refused():
    registry = Registry("widget")
    registry.register("a")(object)
    with pytest.raises(ValueError, match="twice"):
        registry.register("a")(int)


def test_unknown_name_lists_the_known_ones():
    registry = Registry("detector")
    registry.register("retina_unet")(object)
    with pytest.raises(UnknownNameError) as info:
        registry.get("detr")
    assert str(info.value) == "unknown detector 'detr'; registered: retina_unet"
