"""Model definitions. Nothing here imports training or CLI code."""
