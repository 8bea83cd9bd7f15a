"""Reading and writing PyTorch, OpenCLIP and Hugging Face checkpoints (torch is imported lazily)."""
