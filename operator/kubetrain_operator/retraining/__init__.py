"""Retraining a served model: when to start a new TrainingRun (`triggers`), pure."""
