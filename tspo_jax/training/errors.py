"""The two ways a run stops on purpose, shared by every entry point (train, sft, evaluate, fit_check)."""


class StartupError(RuntimeError):
    """The run cannot start (bad data, no retrieval service, unusable checkpoint…); the message names why."""


class NonFiniteUpdates(RuntimeError):
    """Too many non-finite losses or gradients in a row."""
