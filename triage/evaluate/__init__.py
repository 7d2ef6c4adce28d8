"""Stages evaluate and baseline: scoring the splits, decision rules, MC dropout, metrics and their intervals."""
