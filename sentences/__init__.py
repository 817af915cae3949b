"""Sentence segmentation and tokenization, shared by training and the edge (no torch here)."""
