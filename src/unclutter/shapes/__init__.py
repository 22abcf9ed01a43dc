"""The shapes world (images, ground truth, text) and the shipped model built on it."""
