"""Evaluation: sample sets drawn on the pairs actor pool, scored by FID / KID in a pluggable
feature space, or by exact distances on the analytic teacher."""
