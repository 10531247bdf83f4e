"""userapp: a Flower / PyTorch app."""
