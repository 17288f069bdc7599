"""The CIFAR-10 study: the data, the nimarb CNN, its training, checkpoints and the nimarb reference.

Builds on :mod:`influence_over_inference.engine`; knows nothing of the experiments or the report.
"""
