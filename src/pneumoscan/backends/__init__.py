"""Inference backends beside PyTorch: ONNX export, the ONNX Runtime models and their cache."""
