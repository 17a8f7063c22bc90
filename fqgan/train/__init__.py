"""Training: configs (:mod:`.config`), the one loop (:mod:`.loop`, ``fit(config, task)``) and its tasks
(:mod:`.tokenizer`, :mod:`.generator`). The components under the loop are in :mod:`fqgan.runtime`."""
