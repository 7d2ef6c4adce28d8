"""Triage QLoRA study: shared logic for the DVC stages in ``stages/``."""
