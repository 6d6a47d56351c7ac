"""LoRA files for the Wan denoisers: conversion (diffusers' own), matching, and per-run application."""

from .apply import LoraHooks, LoraHooksConfig, LoraTerm, apply_lora_hooks, fused_weight
from .convert import LoraFile, LoraLayer, read_lora
from .match import LoraMatch, match_lora
from .patch import LoraEntry, LoraPatch, with_lora

__all__ = ["LoraEntry", "LoraFile", "LoraHooks", "LoraHooksConfig", "LoraLayer", "LoraMatch", "LoraPatch",
           "LoraTerm", "apply_lora_hooks", "fused_weight", "match_lora", "read_lora", "with_lora"]
