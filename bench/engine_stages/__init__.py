"""The engine benchmark's stages, one module each; ``bench/engine.py`` runs each in its own process."""
