"""Fused-UNet, ONNX and TensorRT export for icd (issue: fast runtime). Not implemented yet."""
