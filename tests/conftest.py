"""Session-wide test settings."""

import torch

# Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits slow every op many-fold.
torch.set_num_threads(1)
