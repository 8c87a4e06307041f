"""Models: the embedded digits flow model (`digits`) that ships with the package."""
