"""Distributed TensorFlow training jobs: one trainer for dense, recurrent and convolutional models."""
