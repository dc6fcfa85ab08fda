"""ConfigError, ModelError and CheckpointError, defined where importing them costs no torch: the run folder's checks
(run_folder.py) raise them before the CLI loads the training stack. config.py, models.py and checkpoint.py re-export them."""


class ModelError(ValueError):
    """The model cannot be loaded; the message names it and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or resume request that cannot be honoured; the message names the folder and what to do."""


class ConfigError(ValueError):
    """A config problem a user can fix; its message is one actionable line."""
