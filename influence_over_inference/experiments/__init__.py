"""The validation experiments: does influence predict what retraining does?

Leave-one-out (:mod:`.loo_convex`, :mod:`.loo_network`), the sign (:mod:`.sign`), flipped-label
detection (:mod:`.flipped`), on the shared retraining machinery (:mod:`.retraining`), metrics
(:mod:`.metrics`), resumable caches (:mod:`.store`) and the summary the report reads
(:mod:`.summary`). Builds on the study and the engine.
"""
