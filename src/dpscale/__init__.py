"""dpscale: the same DP-SGD experiment in every framework, reproducibly."""

__version__ = "0.1.0"
