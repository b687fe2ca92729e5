"""BioD2C: multi-scale image features, the gated image-text fusion decoder and the text-queue semantic loss (`gated_fusion`)."""
