"""Model building blocks: attention kernels, position schemes, layers, the stack, its state."""
