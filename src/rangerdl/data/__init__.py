"""Memory-mapped, segmented datasets (built by issue #3)."""
