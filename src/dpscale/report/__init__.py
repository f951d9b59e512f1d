"""Reporting steps (base env): aggregation into summary.csv, and later figures and the report."""
