"""The command line's commands, one module each, each exposing ``register(subparsers)``.

The top of the architecture: commands call the report, the experiments, the study and the engine.
"""
