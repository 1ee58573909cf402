"""Shared test set-up. Without a GPU the Triton kernels run in Triton's interpreter (slowly, small shapes)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
