"""Backbone networks turned into feature maps: weights, normalisation, taps."""
