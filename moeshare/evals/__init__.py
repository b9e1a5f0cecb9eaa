"""Quality evaluation: how consolidated variants compare with the merging baselines and the originals."""
