"""Post-processing: validate model scores, apply thresholds, rank and keep the top k."""
