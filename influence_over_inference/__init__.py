"""influence-over-inference: which training images help, and which harm, a model's predictions.

Influence functions (Koh & Liang, ICML 2017) for the nimarb CIFAR-10 CNN: data, model, training,
per-sample gradients, inverse-Hessian-vector-product solvers, scores, validation and slides.
"""

__version__ = "0.1.0"
