"""Lightning training recipes for every stage. Imports models and data; never imported by them."""
