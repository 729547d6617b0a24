"""weight_sync: the sidecar that moves trainer weights into the SGLang server (FP8 quantization, transfer)."""
