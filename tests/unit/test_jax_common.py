"""The jax and objax backends' framework-free helpers: the `conv` option resolved, XLA_FLAGS."""

import pytest

from dpscale.backends import _jax_common as jc
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


def test_xla_flags_keep_every_flag_before_the_non_flag_token():
    # XLA stops reading XLA_FLAGS at the first token without dashes; a flag behind it is lost.
    single = jc.xla_flags(1, "--xla_force_host_platform_device_count=2")
    det = jc.joined([*single.split(), jc.DETERMINISTIC_FLAG])
    for text in (single, det):
        tokens = text.split()
        first_plain = next(i for i, t in enumerate(tokens) if not t.startswith("-"))
        assert all(not t.startswith("-") for t in tokens[first_plain:]), text
    assert "--xla_force_host_platform_device_count=2" in single.split()
    assert jc.DETERMINISTIC_FLAG in det.split()
    assert jc.xla_flags(2, "--a") == "--a"
