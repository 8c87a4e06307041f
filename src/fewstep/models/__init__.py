"""Models that ship with the package: the embedded digits flow model and its quality classifier (`digits`)."""
