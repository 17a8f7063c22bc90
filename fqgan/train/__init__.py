"""Training: shared components (:mod:`.common`), configs (:mod:`.config`) and the loops."""
