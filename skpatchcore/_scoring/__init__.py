"""Patch distances to scores and maps: eq. 7 and the anomaly-map operator."""
