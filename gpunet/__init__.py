"""gpunet: borrow a GPU from a notebook."""
