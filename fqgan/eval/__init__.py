"""Evaluation: reconstruction metrics, codebook statistics, the FID Inception (torch-fidelity's, from a
local weight file), rFID and the ``eval-tokenizer`` / ``reconstruct`` commands (:mod:`fqgan.eval.tokenizer`),
FID / IS / precision / recall of generated samples for ``eval-generator`` (:mod:`fqgan.eval.generator`), what
each sub-codebook learned for ``analyze`` (:mod:`fqgan.eval.analysis`), and the kernels' speed-up chart
(:mod:`fqgan.eval.charts`)."""
