"""Code shipped into exported diffusers pipeline folders (megamoe.checkpoint.diffusers_export):
the transformer's modeling code and the pipeline, copied as they are, so they import only torch,
numpy and diffusers (and, relatively, the routers of megamoe.checkpoint.hf_remote)."""
