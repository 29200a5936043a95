"""Configuration and command lines: one frozen dataclass per command, validated once, and the runner of
every command's ``main``."""
