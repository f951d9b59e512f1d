"""The `conv` option of the jax and objax backends, resolved (framework-free part)."""

import pytest

from dpscale.backends._jax_common import conv_impls


def test_auto_uses_patches_only_for_the_dp_step_on_cpu():
    assert conv_impls("auto", "cpu", "jax") == ("patches", "xla")
    assert conv_impls("auto", "gpu", "jax") == ("xla", "xla")
    assert conv_impls("auto", "tpu", "jax") == ("xla", "xla")


def test_explicit_choices_apply_everywhere():
    assert conv_impls("patches", "gpu", "jax") == ("patches", "patches")
    assert conv_impls("xla", "cpu", "objax") == ("xla", "xla")


def test_unknown_choice_names_the_options():
    with pytest.raises(ValueError, match=r"^objax option conv='fft'; expected one of auto, xla"):
        conv_impls("fft", "cpu", "objax")
