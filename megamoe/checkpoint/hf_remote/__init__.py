"""Modeling code shipped into exported Hugging Face folders (`auto_map`, trust_remote_code).

The modules here (configuration, modeling, routers and Mixture-of-Recursions code) are copied as
they are into each folder, so they import only torch and transformers (and each other,
relatively); this package only lets megamoe import them too.
"""
