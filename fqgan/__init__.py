"""The FQGAN tokenizer and the FAR generator (arXiv 2411.16681) on :mod:`fqgan_kernels`: models, data,
training, evaluation and the ``fqgan`` command.

In floors; every import goes down them, never up or sideways (docs/design.md section 3.1)::

    fqgan.cli, fqgan.demo              the commands (all argument parsing; ``python -m fqgan``); the demo
    fqgan.train, fqgan.eval            the one training loop fit(config, task) and its tasks; evaluation
    fqgan.tokenizer, fqgan.generator   the models, losses, configs, presets, loaders (load_tokenizer,
                                       load_generator), official checkpoints (from_official)
    fqgan.data                         data sets, image files, code folders
    fqgan.runtime                      infrastructure (process group, device, checkpoints, logging, EMA,
                                       sampler, DDP/FSDP, config options); imports no model
    fqgan_kernels                      the fused kernels, through their public names only

    from fqgan.tokenizer import FQTokenizer, load_tokenizer
    from fqgan.generator import FAR, FARConfig, generate, load_generator
"""
