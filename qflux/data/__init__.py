"""The paired dataset: scanning and checking the folder, sizing and buckets, images, masks, batch order."""

from qflux.data.dataset import PairDataset, collate_pairs
from qflux.data.pairs import PairRule, PairSample, scan_pairs

__all__ = ["PairDataset", "PairRule", "PairSample", "collate_pairs", "scan_pairs"]
