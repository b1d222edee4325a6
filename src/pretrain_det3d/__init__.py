"""Reproducible study of pre-training for 3D medical object detection."""

__version__ = "0.1.0"
