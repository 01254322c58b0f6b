"""Loading: where weights come from, the device, dtype and quantization, the model and tokenizer."""
