"""The `conv` option of the jax and objax backends, resolved (framework-free part)."""

import pytest

from dpscale.backends._jax_common import conv_impls


def test_auto_uses_patches_only_for_the_dp_step_on_cpu():
    assert conv_impls("auto", "cpu") == ("patches", "xla")
    assert conv_impls("auto", "gpu") == ("xla", "xla")
    assert conv_impls("auto", "tpu") == ("xla", "xla")


def test_explicit_choices_apply_everywhere():
    assert conv_impls("patches", "gpu") == ("patches", "patches")
    assert conv_impls("xla", "cpu") == ("xla", "xla")


def test_unknown_choice_names_the_options():
    with pytest.raises(ValueError, match=r"conv='fft'; expected one of auto, xla, patches"):
        conv_impls("fft", "cpu")
