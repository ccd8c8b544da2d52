"""Units that are the r-th ranked channel of every row of a layer: every expert's r-th least
important neuron (`experts`), every head's r-th least important dimension (`head_dims`).
Removing the k lowest ranks leaves each row its best width − k: one width for every row, as a
config states one."""

import torch
from torch import Tensor


def rank_rows(per_row: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, width) channel scores → each rank's score (the sum over rows of their r-th lowest)
    and each row's channels from least to most important."""
    ranked, order = per_row.cpu().sort(dim=1, stable=True)
    return ranked.sum(0), order


def take_ranks(order: Tensor, ranks: list[int]) -> tuple[list[list[int]], Tensor]:
    """Each row's channels at `ranks` of `order` (sorted; indices among its current ones), and
    the order of the channels left, renumbered: a row's channels after a removed one move down."""
    removed = [sorted(int(c) for c in order[row, ranks]) for row in range(order.shape[0])]
    keep = torch.ones(order.shape[1], dtype=torch.bool)
    keep[ranks] = False
    left = order[:, keep]
    gone = torch.tensor(removed, dtype=torch.long)
    return removed, left - (left.unsqueeze(2) > gone.unsqueeze(1)).sum(2)
