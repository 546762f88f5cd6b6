"""Images to patch features: backbones, their taps and the paper's aggregation."""
