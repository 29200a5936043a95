"""The ADMM trainer: closed-form updates (:mod:`.admm`), the training loop (:mod:`.loop`), the Spark backend
and its per-executor block store, checkpoints, the sample blocks and the training settings."""
