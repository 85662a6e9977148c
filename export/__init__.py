"""The fast runtime: fused-UNet weights, ONNX graphs and TensorRT engines built by `icd export`, the
backends that run them (`--backend`), real-size random-weights models, and `icd bench`."""
