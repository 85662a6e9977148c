"""Engines (import name `icd_export`): fused-UNet weights, ONNX graphs and TensorRT engines built by
`icd export`, torch.compile, and the registry that picks one (`--backend`). Each supplies an epsilon function."""
