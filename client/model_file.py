"""Compatibility: the model file moved to ``fedrecon.model_file`` (shared by the client, the simulator and
the coordinator); this name keeps ``from fedrecon.client.model_file import ModelFile`` working."""

from fedrecon.model_file import FORMAT, ModelFile, ModelFileError, VariableLayout, globals_for_model

__all__ = ["FORMAT", "ModelFile", "ModelFileError", "VariableLayout", "globals_for_model"]
