"""Stages convert and quantize: base-model sources, GGUF conversion and the quantized variants."""
