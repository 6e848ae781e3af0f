"""Hand-written source material for the shipped sample corpus (assembled by ../make_sample.py).

Every text here was written for megalign and is dedicated to the public domain (CC0).
Each module exposes plain data: dicts of topic -> list of texts, or lists of texts.
"""
