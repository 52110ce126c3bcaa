"""Modeling code shipped into exported Hugging Face folders (`auto_map`, trust_remote_code).

The two modules here are copied as they are into each folder, so they import only torch and
transformers (and each other, relatively); this package only lets megamoe import them too.
"""
