"""Evaluation of one run from its predictions (base env): classification metrics for balanced
and long-tailed data (`classification`), membership inference and an empirical epsilon lower
bound (`membership`), and the `evaluate` step writing evaluation.json beside metrics.json."""
