"""Layer 1, models: ViT, attention, SegViT ATM heads, EfficientNet-Lite0 policy net, supertoken
merging, early exits, the Segmenter that joins them, their analytic cost (flops), where
their variables come from (variables, pretrained) and foreign weight conversion."""
