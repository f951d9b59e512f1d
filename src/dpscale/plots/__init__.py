"""Figures of the report: tidy tables (`data`) -> one small function per figure (`figures`).

`python -m dpscale.plots --figure <name> ...` is the step the figure rules run
(workflow/rules/figures.smk); see `dpscale.plots.__main__` for the names.
"""
