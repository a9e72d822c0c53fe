"""Model provider (Megatron GPTModel from a HF config), architecture registry, scalar heads.

Import submodules explicitly; nothing heavy is imported here.
"""
