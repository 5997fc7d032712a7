"""Diagnostics: NUTS reference, comparison metrics, ArviZ export and reports."""
