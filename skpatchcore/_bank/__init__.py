"""The memory bank: coreset selection, building it from images, and searching it."""
