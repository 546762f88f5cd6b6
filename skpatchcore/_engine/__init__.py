"""The torch engine: images -> features -> memory bank -> scores -> maps."""
