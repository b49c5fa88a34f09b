"""Seeing what a network learned: class model visualization (Simonyan et al. 2013, §2)."""

from __future__ import annotations

from .class_model import class_model

__all__ = ["class_model"]
