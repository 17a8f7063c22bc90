"""FAR, the factorized autoregressive generator of FQGAN, for k sub-codebooks (docs/generator.md).

    from fqgan.generator import FAR, FARConfig, generate, from_official
    model = FAR(FARConfig.from_preset("FAR-tiny", num_factors=2, vocab_size=1024, num_classes=10))
    out = model(indices, labels)          # indices [B, k, T], labels [B] -> FARLoss(loss, per_head)
    logits = model.logits(indices, labels)  # [B, k, T, V] (materialised; tests and small inputs)
    codes = generate(model, labels, cfg_scale=[4.0, 2.0], top_k=0, seed=0)  # [B, k, T]
    model = from_official("FAR-B-dual.pt")   # released / official-training checkpoints, by key mapping
    model, codes_meta = load_generator("runs/generator/last.pt")  # either kind of file
"""

from .config import PRESETS, FARConfig
from .generate import check_generator_tokenizer, generate, sample_images
from .load import load_generator
from .model import FAR, FARCache, FARLoss, KVCache
from .official import from_official, to_official_state_dict

__all__ = ["FAR", "PRESETS", "FARCache", "FARConfig", "FARLoss", "KVCache", "check_generator_tokenizer",
           "from_official", "generate", "load_generator", "sample_images", "to_official_state_dict"]
