"""Weight quantization: packed int4/int8 Linear layers with fp16 outlier input channels."""
