"""NVIDIA Triton integration: the bundled server's launcher and the model executor."""
