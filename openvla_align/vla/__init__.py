"""The OpenVLA layer: the only code that knows OpenVLA's layout (``layout``: wrappers, LLM, decoder blocks, grid),
its pixels (``pixels``: fused DINOv2/SigLIP normalisation), its checkpoints (``checkpoint``: loading, batches,
adapters; ``args``: the model options of every command that takes one) and where its logits sit (``decoding``).
Everything else in the package asks this layer."""
