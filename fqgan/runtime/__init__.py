"""The runtime floor under the models' loops and commands: one job per module, no model code.

* :mod:`~fqgan.runtime.dist`: the process group from torchrun's environment, rank helpers, all-reduce.
* :mod:`~fqgan.runtime.device`: device, precision and autocast resolution.
* :mod:`~fqgan.runtime.checkpoint`: atomic save and safe load, RNG state, the resume lookup, local
  weight files, and the error types of the package's file input.
* :mod:`~fqgan.runtime.logging`: metrics JSON lines, the progress bar, the step timer.
* :mod:`~fqgan.runtime.ema`: the exponential moving average of a model's weights.
* :mod:`~fqgan.runtime.sampler`: restartable data order over epochs.
* :mod:`~fqgan.runtime.parallel`: DDP or FSDP2 wrapping, activation checkpointing, sharded (DCP)
  checkpoints.

Nothing here imports the models (:mod:`fqgan.tokenizer`, :mod:`fqgan.generator`) or the loops
above them; the models' loaders use only :mod:`~fqgan.runtime.checkpoint`.
"""
