"""Adapters: PEFT checkpoint -> tensor bundle, and bundle reading/validation (numpy + safetensors
only). The converter arrives with issue 3."""
