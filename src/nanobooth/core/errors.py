"""ConfigError, ModelError, CheckpointError and ExportError, defined where importing them costs no torch: the run
folder's checks (run_folder.py) and export's (interop/export_cli.py) raise them before the CLI loads the training
stack. config.py, models.py, checkpoint.py and interop/ldm.py re-export them."""


class ModelError(ValueError):
    """The model cannot be loaded; the message names it and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or resume request that cannot be honoured; the message names the folder and what to do."""


class ConfigError(ValueError):
    """A config problem a user can fix; its message is one actionable line."""


class ExportError(ModelError):
    """A run that cannot be exported as asked; the message says what to pass instead (interop/export.py)."""
