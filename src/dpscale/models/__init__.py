"""The one model spec every backend builds."""

from dpscale.models.resnet import ResNetSpec, init_weights, num_params, param_shapes

__all__ = ["ResNetSpec", "init_weights", "num_params", "param_shapes"]
