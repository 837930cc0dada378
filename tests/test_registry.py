"""The registry: names, lookup errors, eager option validation, registration rules."""

import pytest

import attention_variants as av
from attention_variants.registry import register


def test_canonical_variants_are_registered():
    assert {"dense", "xla", "blockwise"} <= set(av.names())
    assert list(av.names()) == sorted(av.names())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown attention variant 'flashy'") as err:
        av.get("flashy")
    for name in av.names():
        assert name in str(err.value)


def test_unknown_option_is_a_type_error_listing_accepted_ones():
    with pytest.raises(TypeError, match="'blockwise'.*blok_q.*accepted options: block_k, block_q"):
        av.get("blockwise", blok_q=64)
    with pytest.raises(TypeError, match="accepted options: none"):
        av.get("dense", window=3)


@pytest.mark.parametrize("value", [0, -8, 2.5, "64"])
def test_bad_option_values_fail_at_get_time(value):
    with pytest.raises(ValueError, match="block_q"):
        av.get("blockwise", block_q=value)


def test_bad_implementation_is_rejected():
    with pytest.raises(ValueError, match="implementation"):
        av.get("xla", implementation="triton")


def test_get_binds_options():
    fn = av.get("blockwise", block_q=32)
    assert fn.keywords == {"block_q": 32, "block_k": av.spec("blockwise").defaults["block_k"]}


def test_spec_carries_metadata():
    spec = av.spec("blockwise")
    assert spec.exact and spec.linear_in_length and spec.reference is not None
    assert spec.flops(1, 1024, 1024, 8, 64, causal=True) == 4 * 8 * 64 * 1024 * 1024 / 2
    assert spec.flops(1, 1024, 1024, 8, 64, causal=False) == 4 * 8 * 64 * 1024 * 1024


def test_registration_rules():
    with pytest.raises(ValueError, match="already registered"):
        register("dense", exact=True, reference=None, flops=None)(lambda q, k, v: q)
    with pytest.raises(TypeError, match="contract keyword"):
        register("no_contract_kw", exact=True, reference=None, flops=None)(lambda q, k, v: q)
    assert "no_contract_kw" not in av.names()
