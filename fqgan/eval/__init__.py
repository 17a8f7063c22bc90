"""Evaluation: reconstruction metrics, codebook statistics, the FID Inception and rFID, and the
``eval-tokenizer`` / ``reconstruct`` commands (:mod:`fqgan.eval.tokenizer`)."""
