"""Evaluation: reconstruction metrics, codebook statistics, the FID Inception (torch-fidelity's, from a
local weight file), rFID and the ``eval-tokenizer`` / ``reconstruct`` commands (:mod:`fqgan.eval.tokenizer`),
and FID / IS / precision / recall of generated samples for ``eval-generator`` (:mod:`fqgan.eval.generator`)."""
