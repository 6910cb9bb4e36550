"""What a run reads: prompt sets (bundled, files, the hub), models (resolved to local checkpoints and loaded),
and the one rule for a missing table cell."""
