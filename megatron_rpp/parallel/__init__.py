"""Process groups, collectives over explicit groups, and the CPU backend for megatron-core.

Nothing heavy is imported here: import the submodules you need.
"""
