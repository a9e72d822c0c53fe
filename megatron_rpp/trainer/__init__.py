"""Workers, worker groups and the training loop. Import submodules explicitly."""
