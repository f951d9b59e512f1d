"""The framework-free training runner: `python -m dpscale.runner` (see loop.py)."""
