"""The `lm` family: a causal MoE language model (Megatron's GPTModel with megamoe's decoder, or
the Mixture-of-Recursions decoder). `model.py` builds it, `task.py` feeds it token windows,
`family.py` registers the record. Nothing is imported here: the registry reads the record
without loading Megatron."""
