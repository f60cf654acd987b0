"""Tiny models of every supported family, built offline from transformers' own classes for the tests (not shipped
in the wheel). smolvlm-tiny's own architecture builder, which its recipe uses too, is
``dream_export.presets.smolvlm_tiny.architecture``."""
