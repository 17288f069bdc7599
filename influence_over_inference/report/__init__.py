"""The report: plots, tables, the notebook runner and the slides, built from cached results.

Reads what the experiments, the study and the engine produced; computes nothing expensive itself.
"""
